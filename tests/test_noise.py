"""train.noise: the noise levels each term draws, on the teacher's own clock, and the bins.

SD 1.5 / SDXL configs draw DDPM timesteps uniformly on the configured ranges (checked
against SD's schedule recomputed here from its betas); EDM configs draw exactly today's
Karras levels for the same keys (checked against the Karras formula in float64); the
steps draw every level through `noise_levels`.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar10, imagenet64, sd15, sdxl
from fdistill_jax import config_lib
from fdistill_jax import losses
from fdistill_jax.train import noise
from fdistill_jax.train import noise_levels
from fdistill_jax.train import steps
from fdistill_jax.train import loop as train
from fdistill_jax import plugins
from tests.helpers import small_toy

N = 200_000


def trainer_for(config):
  return train.Trainer(ml_collections.FrozenConfigDict(config), None, devices=jax.devices()[:1],
                       registry=plugins.default_registry())


def batch_at(trainer, step):
  c = trainer.config
  return trainer.to_global(trainer.source.batch(step, global_batch_size=c.batch_size))


def sd_sigmas():
  """SD's 1000 discrete sigmas, float64, from its scaled-linear betas (independent of
  pipelines.denoisers)."""
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  alpha_bar = np.cumprod(1.0 - betas)
  return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def timesteps_of(sigma):
  """The integer timestep of each drawn sigma; every draw must be a level exactly."""
  table = sd_sigmas().astype(np.float32)
  sigma = np.asarray(sigma)
  t = np.clip(np.searchsorted(table, sigma), 0, 999)
  np.testing.assert_array_equal(table[t], sigma)
  return t


def test_the_public_import_path_stays_light():
  """`from fdistill_jax.train import noise_levels` works, and importing the package alone
  does not import the noise module (nor JAX through it)."""
  assert noise_levels is noise.noise_levels
  code = ("import sys, fdistill_jax.train; "
          "print('fdistill_jax.train.noise' in sys.modules, 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("config_module", [sd15, sdxl], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("term, lo, hi", [("fdistill", 20, 980), ("fake_score", 0, 999),
                                          ("gan", 0, 999)])
def test_sd_configs_draw_uniform_timesteps(config_module, term, lo, hi):
  """200k draws of each term of configs/sd15.py:js and configs/sdxl.py:js: the fractions
  with t < 100 and with t in [250, 750] are within 0.02 of those of the uniform
  distribution on [lo, hi] (the binomial standard error is about 0.001), and every draw
  is one of SD's levels in that range."""
  c = config_module.get_config("js")
  t = timesteps_of(noise_levels(c, term, jax.random.PRNGKey(0), N))
  assert t.min() >= lo and t.max() <= hi
  count = hi - lo + 1
  want_low = (min(100, hi + 1) - lo) / count
  want_mid = (min(750, hi) - max(250, lo) + 1) / count
  assert abs(np.mean(t < 100) - want_low) < 0.02
  assert abs(np.mean((t >= 250) & (t <= 750)) - want_mid) < 0.02
  # Against today's Karras draws (29.5% at t < 100, 31.7% in [250, 750]) this fails.
  assert np.mean(t < 100) < 0.15 and np.mean((t >= 250) & (t <= 750)) > 0.45


@pytest.mark.parametrize("config_module", [sd15, sdxl], ids=["sd15", "sdxl"])
def test_sd_bins_hold_equal_shares_of_uniform_timesteps(config_module):
  """Stage-1 bins are equal-width in t on the f-distill range (FastGen bins its time t):
  every timestep of [20, 980] once gives 961 / 10 = 96.1 per bin, so 96 or 97 each; bins
  are monotone in t."""
  c = config_module.get_config("js")
  t = np.arange(20, 981)
  ids = np.asarray(noise.bin_indices(c, jnp.asarray(sd_sigmas()[t], jnp.float32)))
  counts = np.bincount(ids, minlength=c.loss.num_bins)
  assert counts.sum() == t.size and counts.min() >= 96 and counts.max() <= 97, counts
  assert np.all(np.diff(ids) >= 0)
  np.testing.assert_array_equal(ids, np.floor((t - 20) * 10 / 961).astype(int))


def karras_formula(idx, num, sigma_min, sigma_max, rho=7.0):
  """EDM Eq. 5 in float64, ascending: index 0 is sigma_min."""
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (lo + np.asarray(idx, np.float64) / (num - 1) * (hi - lo)) ** rho


@pytest.mark.parametrize("config_module", [cifar10, imagenet64], ids=["cifar10", "imagenet64"])
def test_edm_configs_draw_the_same_sigmas_as_before(config_module):
  """EDM configs keep the Karras draws key for key: the same PRNG call (indices uniform
  on [min_index, max_index]) and the schedule recomputed here in float64 (tolerance:
  float32 rounding, 1e-6 relative); the log-normal fake-score option too."""
  c = config_module.get_config("js")
  lc = c.loss
  assert noise.clock(c) == "karras"
  for i in range(3):
    key = jax.random.fold_in(jax.random.PRNGKey(11), i)
    idx = np.asarray(jax.random.randint(key, (512,), lc.min_index, lc.max_index + 1))
    want = karras_formula(idx, lc.num_sigmas, lc.sigma_min, lc.sigma_max)
    for term in noise.TERMS:
      got = np.asarray(noise_levels(c, term, key, 512))
      np.testing.assert_allclose(got, want, rtol=1e-6)
  lognormal = ml_collections.ConfigDict(c.to_dict())
  lognormal.loss.fake_sigma = "lognormal"
  key = jax.random.PRNGKey(5)
  want = np.exp(lc.p_mean + lc.p_std * np.asarray(jax.random.normal(key, (64,)), np.float64))
  np.testing.assert_allclose(noise_levels(lognormal, "fake_score", key, 64), want, rtol=1e-5)


def test_edm_bins_are_equal_width_in_sigma():
  """EDM bins: `loss.num_bins` equal widths of sigma on [sigma_min, sigma_max] (FastGen's
  t = sigma), computed here by hand."""
  c = cifar10.get_config("js")
  lc = c.loss
  sigma = np.array([0.002, 7.9, 8.1, 40.0, 79.9, 80.0, 100.0], np.float32)
  width = (lc.sigma_max - lc.sigma_min) / lc.num_bins
  want = np.clip(np.floor((sigma - lc.sigma_min) / width), 0, lc.num_bins - 1)
  np.testing.assert_array_equal(noise.bin_indices(c, jnp.asarray(sigma)), want)


def test_the_loss_library_and_the_engine_share_one_bin_spacing():
  assert config_lib.base_config().loss.bin_spacing == losses.DEFAULT_BIN_SPACING == "linear"
  sigma = jnp.asarray([0.01, 5.0, 30.0, 70.0])
  np.testing.assert_array_equal(losses.sigma_bin_indices(sigma, 10),
                                losses.sigma_bin_indices(sigma, 10, spacing="linear"))


def test_validation_names_the_fix():
  c = sd15.get_config("js")
  c.loss.t_fdistill = (20, 1000)
  with pytest.raises(ValueError, match="loss.t_fdistill"):
    config_lib.validate(c, 1)
  c = sd15.get_config("js")
  c.loss.bin_spacing = "log"
  with pytest.raises(ValueError, match="bin_spacing=linear"):
    config_lib.validate(c, 1)
  c = sd15.get_config("js")
  with pytest.raises(ValueError, match="not the teacher's schedule"):
    noise.check_teacher(c, np.linspace(0.01, 80.0, 1000))
  noise.check_teacher(c, sd_sigmas())
  with pytest.raises(ValueError, match="loss.clock=karras"):
    noise.check_teacher(c, None)


class _Spy:
  """Wraps noise.noise_levels, recording each call's term and returning a marked level."""

  def __init__(self, monkeypatch, sigma):
    self.terms, self.sigma = [], sigma
    monkeypatch.setattr(steps.noise, "noise_levels", self)

  def __call__(self, config, term, rng, n):
    del config, rng
    self.terms.append(term)
    return jnp.full((n,), self.sigma, jnp.float32)


@pytest.mark.parametrize("variant, gen_term", [("js", "fdistill"), ("js,gan_only", "gan")])
def test_the_steps_draw_through_noise_levels(monkeypatch, variant, gen_term):
  """The generator step draws once (its f-distill and GAN terms share the teacher pass:
  'fdistill', or 'gan' when the f-distill term is off); the critic step draws for the
  fake score and for the discriminator's real and generated branches. The levels the
  spy returns are the ones the losses see."""
  tokens = variant.split(",")
  c = ml_collections.FrozenConfigDict(small_toy(
      tokens[0], **({"loss.fdistill_weight": 0.0} if "gan_only" in tokens else {})))
  t = trainer_for(c)
  st, batch = t.state, batch_at(t, 0)
  seen = []
  real = losses.fake_score_loss
  monkeypatch.setattr(steps.losses, "fake_score_loss",
                      lambda d, x, sigma, **k: seen.append(np.asarray(sigma)) or real(d, x, sigma,
                                                                                     **k))
  spy = _Spy(monkeypatch, 3.25)
  steps.generator_loss(st.gen, st, t.teacher_vars, jax.random.PRNGKey(0), models=t.models,
                       config=c)
  assert spy.terms == [gen_term]
  spy.terms.clear()
  x, labels = steps.generator_samples(t.models, st.gen, jax.random.PRNGKey(1), c.batch_size,
                                      c.loss.sigma_init)
  steps._critic_grads(st, t.models, t.teacher_vars, x, labels, batch, jax.random.PRNGKey(2), c)
  assert sorted(spy.terms) == ["fake_score", "gan", "gan"]
  assert seen and np.all(seen[-1] == 3.25)


def test_fake_score_weightings_against_their_definitions():
  """x0: unweighted MSE of D (FastGen); eps: MSE of the implied eps, (x_t - D) / sigma,
  against the noise (DMD2); edm: lambda(sigma) MSE."""
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  n = rng.standard_normal(x0.shape).astype(np.float32)
  sigma = np.array([0.03, 1.0, 14.6], np.float32)
  x_t = x0 + sigma[:, None, None, None] * n
  eps_hat = rng.standard_normal(x0.shape).astype(np.float32)
  d = x_t - sigma[:, None, None, None] * eps_hat
  mse = lambda a, b: np.mean((a - b) ** 2, axis=(1, 2, 3))
  got = {w: np.asarray(losses.fake_score_loss(d, x0, sigma, weighting=w))
         for w in losses.FAKE_SCORE_WEIGHTINGS}
  np.testing.assert_allclose(got["x0"], mse(d, x0), rtol=1e-5)
  np.testing.assert_allclose(got["eps"], mse(eps_hat, n), rtol=1e-3)
  lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
  np.testing.assert_allclose(got["edm"], lam * mse(d, x0), rtol=1e-5)


def test_approximate_r1_is_the_mse_of_logits():
  """FastGen's form: mean over each example of (l(x) - l(x + alpha n))^2; for a linear
  logit w.x it is alpha^2 (w.n)^2, about alpha^2 ||w||^2 = alpha^2 x exact R1."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal(64), jnp.float32)
  x = jnp.zeros((4096, 64))
  n = jax.random.normal(jax.random.PRNGKey(0), x.shape)
  logit = lambda v: v @ w
  approx = losses.approx_r1_penalty(logit(x)[:, None], logit(x + 0.1 * n)[:, None])
  np.testing.assert_allclose(approx, 0.01 * np.asarray(n @ w) ** 2, rtol=1e-4, atol=1e-6)
  exact = losses.r1_penalty(logit, x)
  np.testing.assert_allclose(np.mean(approx) / 0.01, np.mean(exact), rtol=0.05)


def test_the_critic_step_adds_fastgens_approximate_r1(monkeypatch):
  """loss.r1_form='approx': the discriminator loss is the GAN loss plus r1_gamma x the mean
  of (l(x_t) - l(x_t + 0.1 n))^2 over the real batch (FastGen's gan_r1_reg_weight form),
  recomputed here from the heads; no second backward pass is traced."""
  c = ml_collections.FrozenConfigDict(small_toy(
      "js", **{"loss.r1_gamma": 2.0, "loss.r1_form": "approx"}))
  t = trainer_for(c)
  st, real = t.state, batch_at(t, 0)["images"]
  rng = jax.random.PRNGKey(6)
  x, labels = steps.generator_samples(t.models, st.gen, rng, c.batch_size, c.loss.sigma_init)
  loss, metrics = steps.disc_loss(st.disc, st.fake, t.models, t.teacher_vars, real, None, x,
                                  labels, rng, c)
  k_real, _ = jax.random.split(rng)
  real_t, real_sigma = steps._noised(k_real, real, c)
  logits = lambda v: t.models.heads.apply({"params": st.disc}, steps.features(
      t.models, t.teacher_vars, st.fake, v, real_sigma, None, "teacher")[1])
  n = jax.random.normal(jax.random.fold_in(rng, steps.R1_NOISE), real_t.shape)
  want = np.mean(np.asarray(logits(real_t) - logits(real_t + 0.1 * n)) ** 2)
  np.testing.assert_allclose(metrics["disc/r1_approx"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["disc/gan_loss"] + 2.0 * want, rtol=1e-5)
  assert "disc/r1" not in metrics
