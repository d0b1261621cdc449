"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2), jit-friendly.

Noise levels (Eq. 5): t_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho
for i < N, and t_N = 0. Each step optionally raises the noise level to
t_hat = (1 + gamma_i) t_i with gamma_i = min(S_churn / N, sqrt(2) - 1) when
S_min <= t_i <= S_max (adding fresh noise of variance t_hat^2 - t_i^2, scaled by
S_noise), takes an Euler step of dx/dt = (x - D(x; t)) / t to t_{i+1}, and
corrects it with the trapezoidal (Heun) rule unless t_{i+1} = 0.

The schedule is computed in float64 numpy (static); the loop runs in float32
under `lax.fori_loop`, so the whole sampler jits with the denoiser inside.

Example:

  denoise = lambda x, s, y: net.apply(variables, x, s, y)
  images = jax.jit(functools.partial(edm_sampler, denoise, shape=(64, 32, 32, 3),
                                     **EDM_SAMPLER_PRESETS["cifar10"]))(rng, class_labels=y)
"""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Settings of EDM's README for its published FIDs.
EDM_SAMPLER_PRESETS = {
    # edm-cifar10-32x32-cond-vp: deterministic, 18 steps (35 network evaluations).
    "cifar10": dict(num_steps=18),
    # edm-imagenet-64x64-cond-adm: stochastic, 256 steps.
    "imagenet64": dict(num_steps=256, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003),
}


def edm_sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> np.ndarray:
  """The N + 1 noise levels t_0 > ... > t_{N-1} = sigma_min > t_N = 0 (Eq. 5), float64."""
  if num_steps < 2:
    raise ValueError(f"edm_sampler needs num_steps >= 2 (got {num_steps}): Eq. 5 divides by N - 1.")
  i = np.arange(num_steps, dtype=np.float64)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
  return np.concatenate([t, [0.0]])


def _churn_gammas(t, num_steps, s_churn, s_min, s_max):
  g = min(s_churn / num_steps, math.sqrt(2) - 1)
  return np.where((t[:-1] >= s_min) & (t[:-1] <= s_max), g, 0.0)


def edm_sampler(denoise_fn: Callable, rng: jax.Array, shape, *, class_labels=None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0,
                s_max: float = math.inf, s_noise: float = 1.0,
                latents: Optional[jax.Array] = None) -> jax.Array:
  """Samples with EDM's deterministic (s_churn=0) or stochastic Heun sampler.

  Args:
    denoise_fn: `denoise_fn(x, sigma, class_labels) -> D(x; sigma)`, sigma of shape [B].
    rng: PRNG key: `split(rng)[0]` draws the latents, `fold_in(split(rng)[1], i)`
      the churn noise of step i.
    shape: output shape, batch first (e.g. (B, H, W, C)).
    class_labels: passed through to `denoise_fn`.
    num_steps, sigma_min, sigma_max, rho: the time discretisation (Eq. 5).
    s_churn, s_min, s_max, s_noise: stochasticity (Algorithm 2).
    latents: optional standard-normal latents of `shape` (replaces the draw
      from rng, e.g. to follow EDM's per-seed latents).

  Returns:
    float32 samples of `shape`.
  """
  t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
  gammas = _churn_gammas(t, num_steps, s_churn, s_min, s_max)
  t_hat = t[:-1] * (1 + gammas)
  noise_std = np.sqrt(t_hat ** 2 - t[:-1] ** 2) * s_noise
  stochastic = bool(np.any(noise_std > 0))
  t, t_hat, noise_std = (jnp.asarray(a, jnp.float32) for a in (t, t_hat, noise_std))
  key_latents, key_churn = jax.random.split(rng)
  if latents is None:
    latents = jax.random.normal(key_latents, shape, jnp.float32)
  batch = shape[0]

  def denoise(x, sigma):
    return denoise_fn(x, jnp.full((batch,), sigma, jnp.float32), class_labels).astype(jnp.float32)

  def euler(i, x):
    """Churn, then an Euler step from t_hat_i to t_{i+1}; returns (x_hat, d, x_next)."""
    x_hat = x
    if stochastic:
      x_hat = x + noise_std[i] * jax.random.normal(jax.random.fold_in(key_churn, i), shape)
    d = (x_hat - denoise(x_hat, t_hat[i])) / t_hat[i]
    return x_hat, d, x_hat + (t[i + 1] - t_hat[i]) * d

  def heun_step(i, x):
    x_hat, d, x_next = euler(i, x)
    d_prime = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
    return x_hat + (t[i + 1] - t_hat[i]) * (0.5 * d + 0.5 * d_prime)

  x = jnp.asarray(latents, jnp.float32) * t[0]
  x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
  return euler(num_steps - 1, x)[2]  # The last step ends at t_N = 0: Euler only.
