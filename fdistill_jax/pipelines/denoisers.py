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


MAX_TRAIN_TIMESTEPS = 100_000


def _schedule_number(c, key, default, low, high):
  """A finite number in [low, high] from the scheduler config, else one line naming it."""
  value = c.get(key, default)
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not np.isfinite(value) or not low <= value <= high):
    raise ConversionError(f"scheduler config: {key}={value!r} must be a finite number in "
                          f"[{low}, {high}]; the file is corrupt.")
  return value


def _betas_from_config(c):
  kind = c.get("beta_schedule", "linear")
  n = _schedule_number(c, "num_train_timesteps", 1000, 1, MAX_TRAIN_TIMESTEPS)
  if n != int(n):
    raise ConversionError(f"scheduler config: num_train_timesteps={n!r} must be an integer.")
  n = int(n)
  start = float(_schedule_number(c, "beta_start", 0.0001, 0.0, 1.0))
  end = float(_schedule_number(c, "beta_end", 0.02, 0.0, 1.0))
  if c.get("trained_betas") is not None:
    betas = c["trained_betas"]
    if (not isinstance(betas, (list, tuple)) or not 0 < len(betas) <= MAX_TRAIN_TIMESTEPS
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
      raise ConversionError("scheduler config: trained_betas must be a list of 1 to "
                            f"{MAX_TRAIN_TIMESTEPS:,} numbers.")
    return np.asarray(betas, np.float64)
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
    betas = _betas_from_config(config)
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
      raise ConversionError("scheduler config: every beta must be a finite number in (0, 1) "
                            f"(got values in [{np.nanmin(betas):.3g}, {np.nanmax(betas):.3g}]"
                            f"{', with NaN' if np.isnan(betas).any() else ''}); check beta_start, "
                            "beta_end and trained_betas.")
    ac = np.cumprod(1.0 - betas)
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


def eps_denoiser(eps_fn: Callable, schedule: DiscreteSchedule, timestep: str = "interpolate",
                 has_aux: bool = False):
  """D(x, sigma, cond) = x - sigma eps_fn(x / sqrt(1 + sigma^2), t(sigma), cond), float32.

  The one place the eps -> D conversion is written: the pipeline's denoiser and
  the engine's `LatentDenoiser` (`fdistill_jax.pipelines.sd`) both call it.

  Args:
    eps_fn: `eps_fn(z, t, cond) -> eps` on the DDPM scale (z = sqrt(alpha_bar) x),
      or `-> (eps, aux)` when `has_aux`.
    schedule: the model's discrete schedule.
    timestep: 'interpolate' or 'nearest' (module docstring).
    has_aux: `denoise` returns (D, aux), passing eps_fn's aux through.
  """
  def denoise(x, sigma, cond):
    x = jnp.asarray(x, jnp.float32)
    s = _bcast(sigma, x)
    t = schedule.sigma_to_t(s.reshape(-1), timestep)
    out = eps_fn(x / jnp.sqrt(1.0 + s**2), t, cond)
    eps, aux = out if has_aux else (out, None)
    denoised = x - s * jnp.asarray(eps, jnp.float32)
    return (denoised, aux) if has_aux else denoised
  return denoise


def unet_inputs(cond):
  """(encoder_hidden_states, U-Net keyword inputs) of a conditioning: SD 1.x's context array
  [B, L, C], or SDXL's pytree {'context', 'pooled', 'time_ids'}."""
  if isinstance(cond, Mapping):
    return cond["context"], {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
  return cond, {}


def unet_denoiser(unet, unet_variables, schedule: DiscreteSchedule, timestep="interpolate"):
  """D(x, sigma, cond) of a UNet2DConditionModel (SD 1.x or SDXL conditioning, `unet_inputs`)."""
  def eps_fn(z, t, cond):
    context, extra = unet_inputs(cond)
    return unet.apply(unet_variables, z, t, context, **extra)
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
