r"""Stable Diffusion's discrete eps-prediction schedule as an EDM-style denoiser D(x; sigma).

SD 1.x is trained on a 1000-step DDPM schedule with `scaled_linear` betas,
beta_t = (sqrt(0.00085) + t / 999 (sqrt(0.012) - sqrt(0.00085)))^2, and
alpha_bar_t = prod_{s <= t} (1 - beta_s). Its U-Net eps(z_t, t) sees
z_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) n. Dividing by
sqrt(alpha_bar_t) gives the variance-exploding form x = x_0 + sigma_t n with

  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),

so, as k-diffusion's `DiscreteEpsDDPMDenoiser` (crowsonkb/k-diffusion
`k_diffusion/external.py`) does,

  D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)),

where x / sqrt(1 + sigma^2) = z_t is the U-Net's own input and t(sigma) the
timestep of sigma on the discrete schedule. Samplers, losses and the f-distill
engine then work in sigma space unchanged (sigma from 0.0292 to 14.61 for SD 1.5).

t(sigma): `timestep='interpolate'` (the default, k-diffusion's `quantize=False`)
interpolates linearly in log sigma between the two neighbouring discrete
levels, giving fractional timesteps that the sinusoidal embedding accepts;
sigmas outside [sigma_min, sigma_max] clamp to t = 0 or 999. At the discrete
sigmas themselves it returns the integer t exactly. `timestep='nearest'`
rounds to the nearest level in log sigma (k-diffusion's `quantize=True`).

Classifier-free guidance (`cfg_denoiser`) combines the conditional and the
unconditional (empty-prompt) denoisers as D_u + w (D_c - D_u), which equals
guiding eps (D is affine in eps), evaluating both in one batch.
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.loaders.errors import ConversionError

TIMESTEP_MODES = ("interpolate", "nearest")


def _betas_from_config(c):
  kind, n = c.get("beta_schedule", "linear"), int(c.get("num_train_timesteps", 1000))
  start, end = float(c.get("beta_start", 0.0001)), float(c.get("beta_end", 0.02))
  if c.get("trained_betas") is not None:
    return np.asarray(c["trained_betas"], np.float64)
  if kind == "scaled_linear":
    return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
  if kind == "linear":
    return np.linspace(start, end, n, dtype=np.float64)
  raise ConversionError(f"scheduler config: beta_schedule={kind!r} is not implemented "
                        "(supported: scaled_linear, linear, trained_betas).")


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
  """The discrete DDPM schedule and its sigma <-> timestep maps.

  Attributes:
    alphas_cumprod: alpha_bar_t, t = 0 .. T-1 (float64 numpy).
    set_alpha_to_one: DDIM's final step goes to sigma = 0 (True) or to
      sigma_0 = sigma_min (False, SD 1.5's scheduler config).
  """
  alphas_cumprod: np.ndarray
  set_alpha_to_one: bool = False
  steps_offset: int = 1

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "DiscreteSchedule":
    """From a diffusers `scheduler/scheduler_config.json` dict (eps prediction only)."""
    if config.get("prediction_type", "epsilon") != "epsilon":
      raise ConversionError(f"scheduler config: prediction_type={config['prediction_type']!r} "
                            "is not implemented; only 'epsilon' (SD 1.x) is.")
    if config.get("rescale_betas_zero_snr", False):
      raise ConversionError("scheduler config: rescale_betas_zero_snr=true is not implemented.")
    ac = np.cumprod(1.0 - _betas_from_config(config))
    return cls(ac, bool(config.get("set_alpha_to_one", True)), int(config.get("steps_offset", 0)))

  @property
  def sigmas(self) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t (float64)."""
    return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

  @property
  def sigma_min(self) -> float:
    return float(self.sigmas[0])

  @property
  def sigma_max(self) -> float:
    return float(self.sigmas[-1])

  def sigma_to_t(self, sigma, mode: str = "interpolate"):
    """Timestep of `sigma` (float32, any shape); see the module docstring for the modes."""
    if mode not in TIMESTEP_MODES:
      raise ValueError(f"timestep mode {mode!r}; expected one of {TIMESTEP_MODES}.")
    log_sigmas = jnp.asarray(np.log(self.sigmas), jnp.float32)
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
    if mode == "nearest":
      dist = jnp.abs(log_sigma[..., None] - log_sigmas)
      return jnp.argmin(dist, axis=-1).astype(jnp.float32)
    return jnp.interp(log_sigma, log_sigmas, jnp.arange(len(self.sigmas), dtype=jnp.float32))

  def t_to_sigma(self, t):
    """sigma of (fractional) timesteps, interpolating log sigma linearly (inverse of sigma_to_t)."""
    t = jnp.asarray(t, jnp.float32)
    log_sigmas = jnp.asarray(np.log(self.sigmas), jnp.float32)
    return jnp.exp(jnp.interp(t, jnp.arange(len(self.sigmas), dtype=jnp.float32), log_sigmas))


def _bcast(sigma, x):
  sigma = jnp.asarray(sigma, jnp.float32).reshape(-1)
  return jnp.broadcast_to(sigma, (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))


def eps_denoiser(eps_fn: Callable, schedule: DiscreteSchedule, timestep: str = "interpolate"):
  """D(x, sigma, cond) = x - sigma eps_fn(x / sqrt(1 + sigma^2), t(sigma), cond), float32.

  Args:
    eps_fn: `eps_fn(z, t, cond) -> eps` on the DDPM scale (z = sqrt(alpha_bar) x).
    schedule: the model's discrete schedule.
    timestep: 'interpolate' or 'nearest' (module docstring).
  """
  def denoise(x, sigma, cond):
    x = jnp.asarray(x, jnp.float32)
    s = _bcast(sigma, x)
    t = schedule.sigma_to_t(s.reshape(-1), timestep)
    eps = eps_fn(x / jnp.sqrt(1.0 + s**2), t, cond)
    return x - s * jnp.asarray(eps, jnp.float32)
  return denoise


def unet_denoiser(unet, unet_variables, schedule: DiscreteSchedule, timestep="interpolate"):
  """D(x, sigma, context) of a UNet2DConditionModel; `context` = [B, L, C] text embeddings."""
  eps_fn = lambda z, t, context: unet.apply(unet_variables, z, t, context)
  return eps_denoiser(eps_fn, schedule, timestep)


def cfg_denoiser(denoise: Callable, uncond, scale: float):
  """Classifier-free guidance: D_u + scale (D_c - D_u), both in one batched call.

  Args:
    denoise: `denoise(x, sigma, cond)` (for SD, cond = text embeddings [B, L, C];
      for SDXL a dict of arrays with a leading batch axis).
    uncond: the unconditional cond for one sample (SD: the empty prompt's
      embedding [L, C], or [1, L, C]; a pytree of the same structure as cond),
      broadcast over the batch.
    scale: guidance weight w; 1 returns the conditional denoiser alone.
  """
  if scale == 1.0:
    return denoise

  def pair(c, u):  # [cond; uncond broadcast over the batch], per leaf of a pytree cond
    u = jnp.broadcast_to(jnp.asarray(u).reshape((1,) + c.shape[1:]), c.shape)
    return jnp.concatenate([c, u.astype(c.dtype)])

  def guided(x, sigma, cond):
    b = x.shape[0]
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (b,))
    both = denoise(jnp.concatenate([x, x]), jnp.concatenate([s, s]),
                   jax.tree.map(pair, cond, uncond))
    d_cond, d_uncond = both[:b], both[b:]
    return d_uncond + scale * (d_cond - d_uncond)
  return guided
