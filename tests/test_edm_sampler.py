"""Tests for fdistill_jax.edm_sampler against closed forms and a numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.pipelines.edm_sampler import EDM_SAMPLER_PRESETS
from fdistill_jax.pipelines.edm_sampler import edm_sampler
from fdistill_jax.pipelines.edm_sampler import edm_sigma_steps

MU, S = 0.7, 0.5  # Data distribution N(MU, S^2) per coordinate.


def gaussian_denoiser(x, sigma, class_labels=None):
  """Exact E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma n."""
  del class_labels
  sigma = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def nonlinear_denoiser_np(x, sigma):
  """A smooth, non-Gaussian denoiser (only its consistency with numpy matters)."""
  return np.tanh(x) * (1.0 / (1.0 + sigma)) + 0.1 * np.sin(3 * x) * sigma / (1 + sigma ** 2)


def nonlinear_denoiser(x, sigma, class_labels=None):
  sigma = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return jnp.tanh(x) * (1.0 / (1.0 + sigma)) + 0.1 * jnp.sin(3 * x) * sigma / (1 + sigma ** 2)


def heun_reference_np(denoise, latents, noises, num_steps, sigma_min, sigma_max, rho,
                      s_churn, s_min, s_max, s_noise):
  """Algorithm 2 of Karras et al. (2022) written out in float64 numpy, step by step."""
  steps = [(sigma_max ** (1 / rho) + i / (num_steps - 1) *
            (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho for i in range(num_steps)]
  steps.append(0.0)
  x = latents.astype(np.float64) * steps[0]
  for i in range(num_steps):
    t_cur, t_next = steps[i], steps[i + 1]
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
    t_hat = t_cur + gamma * t_cur
    x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * noises[i]
    d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x = x_hat + (t_next - t_hat) * d_cur
    if i < num_steps - 1:
      d_prime = (x - denoise(x, t_next)) / t_next
      x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
  return x


def _jax_noises(rng, shape, num_steps):
  """The sampler's documented noise draws: latents, then churn noise of each step."""
  key_latents, key_churn = jax.random.split(rng)
  latents = np.asarray(jax.random.normal(key_latents, shape), np.float64)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(key_churn, i), shape), np.float64)
            for i in range(num_steps)]
  return latents, noises


def test_sigma_steps_match_eq5():
  t = edm_sigma_steps(18, 0.002, 80.0, 7.0)
  assert t.shape == (19,) and t[-1] == 0.0
  np.testing.assert_allclose([t[0], t[17]], [80.0, 0.002], rtol=1e-12)
  # Eq. 5 at i = 9, evaluated by hand.
  expected = (80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(t[9], expected, rtol=1e-12)
  with pytest.raises(ValueError, match="num_steps"):
    edm_sigma_steps(1)


@pytest.mark.parametrize("num_steps,tol", [
    # Heun's truncation error on this ODE, measured in float64: 5.5% of the output
    # spread at EDM's 18 steps (the first steps are long), 0.03% at 256 steps.
    (18, 0.06), (256, 1e-3)])
def test_deterministic_sampler_solves_gaussian_flow_in_closed_form(num_steps, tol):
  """With the exact denoiser, the probability-flow ODE from x_T = sigma_max z has the
  solution x_0 = MU + (x_T - MU) S / sqrt(S^2 + sigma_max^2) (per sample)."""
  shape = (4096, 2)
  rng = jax.random.key(0)
  z = jax.random.normal(jax.random.key(1), shape)
  out = jax.jit(lambda r, z: edm_sampler(gaussian_denoiser, r, shape, latents=z,
                                          num_steps=num_steps))(rng, z)
  x_t = 80.0 * np.asarray(z, np.float64)
  exact = MU + (x_t - MU) * S / math.sqrt(S ** 2 + 80.0 ** 2)
  # Per sample, relative to the sample's distance from the mean (tolerance above).
  np.testing.assert_allclose(np.asarray(out) - MU, exact - MU, rtol=tol, atol=1e-5)
  if num_steps == 256:
    # The output distribution is then N(MU, S^2) up to the sigma_max prior's offset
    # (MU S / 80 ~ 0.004 on the mean): moments to 4 sampling standard errors.
    n = out.size
    assert abs(float(out.mean()) - MU) < 0.01 + 4 * S / math.sqrt(n)
    assert abs(float(out.std()) - S) < 4 * S / math.sqrt(2 * n)


@pytest.mark.parametrize("churn", [
    dict(s_churn=0.0),
    dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003),  # EDM's ImageNet setting.
])
def test_sampler_matches_numpy_reference(churn):
  shape, num_steps = (8, 3, 3, 2), 7
  rng = jax.random.key(3)
  kwargs = dict(num_steps=num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0)
  full = dict(s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0) | churn
  out = edm_sampler(nonlinear_denoiser, rng, shape, **kwargs, **churn)
  latents, noises = _jax_noises(rng, shape, num_steps)
  ref = heun_reference_np(nonlinear_denoiser_np, latents, noises, **kwargs, **full)
  # float32 loop vs float64 reference: relative 1e-5 of the output scale.
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_stochastic_sampler_matches_gaussian_moments():
  """With churn, each step re-noises exactly, so samples are still ~N(MU', S'^2)."""
  shape = (20000,)
  preset = EDM_SAMPLER_PRESETS["imagenet64"]  # 256 steps, S_churn=40, S_noise=1.003.
  out = jax.jit(lambda r: edm_sampler(gaussian_denoiser, r, shape, **preset))(jax.random.key(5))
  mean_exact = MU * (1 - S / math.sqrt(S ** 2 + 80.0 ** 2))
  std_exact = S * 80.0 / math.sqrt(S ** 2 + 80.0 ** 2)
  # Four sampling standard errors plus 1% slack (discretisation error of the
  # churned steps and S_noise=1.003's slight over-noising).
  n = out.size
  assert abs(float(out.mean()) - mean_exact) < 4 * S / math.sqrt(n) + 0.01 * S
  assert abs(float(out.std()) - std_exact) < 4 * S / math.sqrt(2 * n) + 0.01 * S


def test_class_labels_reach_the_denoiser():
  seen = {}

  def denoise(x, sigma, labels):
    seen["labels"] = labels
    return gaussian_denoiser(x, sigma) + 0.0 * labels.sum()

  labels = jnp.eye(3)[jnp.array([0, 2])]
  edm_sampler(denoise, jax.random.key(0), (2, 4), class_labels=labels, num_steps=3)
  np.testing.assert_array_equal(np.asarray(seen["labels"]), np.asarray(labels))
