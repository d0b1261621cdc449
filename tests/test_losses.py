"""Tests of fdistill_jax.losses against independent computations.

References used here: numpy re-implementations written from the paper and
from DMD2's formulas, scipy quadrature of D_f for an analytic Gaussian teacher
and student (Theorem 1), and closed forms for EDM / GAN / R1 / samplers.
"""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special, stats

from fdistill_jax import divergences, losses

NAMES = ["rkl", "softened_rkl", "js", "squared_hellinger", "fkl", "jeffreys"]

# log h(u = log r), written independently from Table 1 (see test_divergences).
NP_LOG_H = {
    "rkl": lambda u: np.zeros_like(u),
    "softened_rkl": lambda u: -np.logaddexp(0.0, u),
    "js": lambda u: -np.logaddexp(0.0, -u),
    "squared_hellinger": lambda u: 0.5 * u - np.log(2.0),
    "fkl": lambda u: u,
    "jeffreys": lambda u: np.logaddexp(0.0, u),
}


def _batch(seed, b=8, shape=(3, 4, 4), sigma_range=(0.01, 50.0), logit_std=2.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b,) + shape).astype(np.float32)
  dt = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  df = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  log_r = (logit_std * rng.normal(size=b)).astype(np.float32)
  sigma = np.exp(rng.uniform(*np.log(sigma_range), size=b)).astype(np.float32)
  return x, dt, df, log_r, sigma


# The numpy references below bin log sigma (stage 1 over sigma drawn log-uniformly), so the
# library is called with bin_spacing='log'; its default, 'linear' (FastGen's bins of sigma),
# is checked against its own reference in test_linear_bins_are_fastgens_bins_of_sigma.
LOG_BINS = {"bin_spacing": "log"}
_log_weight = functools.partial(losses.fdistill_log_weight, **LOG_BINS)


def _grad_x(x, dt, df, log_r, sigma, **kw):
  kw = {**LOG_BINS, **kw}
  fn = lambda x: losses.fdistill_generator_loss(x, dt, df, log_r, sigma, **kw)
  return jax.value_and_grad(fn, has_aux=True)(x)


def _np_log_weight(log_r, sigma, name, normalize_ratio=True,
                   normalize_weight=True, num_bins=10, smin=0.002, smax=80.0):
  """Independent numpy version of the two-stage normalisation (Section 4)."""
  log_r = log_r.astype(np.float64)
  edges = np.linspace(np.log(smin), np.log(smax), num_bins + 1)
  idx = np.clip(np.digitize(np.log(sigma), edges) - 1, 0, num_bins - 1)
  bin_log_mean = np.zeros(num_bins)
  for k in np.unique(idx):
    sel = idx == k
    bin_log_mean[k] = special.logsumexp(log_r[sel]) - np.log(sel.sum())
  if normalize_ratio:
    log_r = log_r - bin_log_mean[idx]
  log_h = NP_LOG_H[name](log_r)
  if normalize_weight:
    log_h = log_h - (special.logsumexp(log_h) - np.log(len(log_h)))
  return log_h, log_r, idx, bin_log_mean


# ----------------------------------------------------------------------------
# Gradient contract.


@pytest.mark.parametrize("name", NAMES)
def test_gradient_contract_no_time_weighting(name):
  """d loss/d x_i = h_i (D_fake - D_teacher)_i / (sigma_i^2 x.size)."""
  x, dt, df, log_r, sigma = _batch(0)
  (_, aux), g = _grad_x(x, dt, df, log_r, sigma, divergence=name,
                        time_weighting="none", normalize_ratio=False,
                        normalize_weight=False)
  h = np.exp(NP_LOG_H[name](log_r.astype(np.float64)))
  want = (h / sigma**2)[:, None, None, None] * (df - dt) / x.size
  np.testing.assert_allclose(np.asarray(g), want, rtol=2e-4, atol=1e-9)  # f32
  np.testing.assert_allclose(float(aux["h_mean"]), h.mean(), rtol=1e-5)


def test_sigma_shapes_are_equivalent():
  x, dt, df, log_r, sigma = _batch(1)
  kw = dict(divergence="js", time_weighting="none")
  _, g1 = _grad_x(x, dt, df, log_r, sigma, **kw)
  _, g2 = _grad_x(x, dt, df, log_r, sigma.reshape(-1, 1, 1, 1), **kw)
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
  _, g3 = _grad_x(x, dt, df, log_r, np.float32(0.7), normalize_ratio=False,
                  normalize_weight=False, **kw)
  h = np.exp(NP_LOG_H["js"](log_r.astype(np.float64)))
  want = (h / 0.49)[:, None, None, None] * (df - dt) / x.size
  np.testing.assert_allclose(np.asarray(g3), want, rtol=2e-4, atol=1e-9)


def _np_dmd2(x, pred_real, pred_fake):
  """DMD2's distribution-matching loss and gradient (tianweiy/DMD2)."""
  p_real, p_fake = x - pred_real, x - pred_fake
  grad = (p_real - p_fake) / np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
  grad = np.nan_to_num(grad)
  loss = 0.5 * np.mean((x - (x - grad))**2)
  return loss, grad / x.size


@pytest.mark.parametrize("norm_r,norm_h", [(True, True), (True, False),
                                           (False, True), (False, False)])
def test_rkl_dmd_equals_dmd2(norm_r, norm_h):
  """rkl + 'dmd' reproduces DMD2 whatever the normalisation flags (h = 1)."""
  x, dt, df, log_r, sigma = _batch(2, b=6, logit_std=5.0)
  (loss, aux), g = _grad_x(x, dt, df, log_r, sigma, divergence="rkl",
                           time_weighting="dmd", normalize_ratio=norm_r,
                           normalize_weight=norm_h)
  x64, dt64, df64 = (a.astype(np.float64) for a in (x, dt, df))
  want_loss, want_grad = _np_dmd2(x64, dt64, df64)
  np.testing.assert_allclose(np.asarray(g), want_grad, rtol=1e-4, atol=1e-10)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
  np.testing.assert_allclose([aux["h_min"], aux["h_max"]], [1.0, 1.0],
                             rtol=1e-6)


def test_dmd_normaliser_guard_for_zero_residual():
  """x == D_teacher: weight is 1/dmd_eps (finite), not DMD2's nan_to_num."""
  x, dt, df, log_r, sigma = _batch(3, b=4)
  dt[1] = x[1]
  (loss, _), g = _grad_x(x, dt, df, log_r, sigma, divergence="rkl",
                         dmd_eps=1e-3)
  res = np.abs(x - dt).mean(axis=(1, 2, 3))
  w = 1.0 / np.maximum(res, 1e-3)
  want = w[:, None, None, None] * (df - dt) / x.size
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------
# Theorem 1 through the loss: analytic teacher and Gaussian student in 1-D.

_W, _M, _S = np.array([0.3, 0.7]), np.array([-1.0, 1.0]), np.array([0.5, 0.3])
_SIGMA = 0.5
_THETA = np.array([0.3, 1.2])  # student x = mu + s z


def _teacher_logits(y):
  v = _S**2 + _SIGMA**2
  return np.log(_W) - 0.5 * np.log(2 * np.pi * v) - 0.5 * (y[..., None] -
                                                            _M)**2 / v


def _student_terms(theta, z, e):
  """x, D_teacher, D_fake and exact log r at x_t = x + sigma e (jax)."""
  mu, s = theta
  x = mu + s * z
  y = x + _SIGMA * e
  v_p, v_q = _S**2 + _SIGMA**2, s**2 + _SIGMA**2
  logits = _teacher_logits(y)
  score_p = jnp.sum(jax.nn.softmax(logits, -1) * (_M - y[:, None]) / v_p, -1)
  log_q = -0.5 * jnp.log(2 * np.pi * v_q) - 0.5 * (y - mu)**2 / v_q
  log_r = jax.nn.logsumexp(logits, -1) - log_q
  dt = y + _SIGMA**2 * score_p
  df = y + _SIGMA**2 * (mu - y) / v_q
  return x[:, None], dt[:, None], df[:, None], log_r


@functools.partial(jax.jit, static_argnums=1)
def _loss_grad_theta(theta, name, z, e):
  def fn(theta):
    x, dt, df, log_r = _student_terms(theta, z, e)
    return losses.fdistill_generator_loss(
        x, dt, df, log_r, _SIGMA, divergence=name, time_weighting="none",
        normalize_ratio=False, normalize_weight=False)[0]
  return jax.grad(fn)(theta)


NP_F = {  # f of Table 1, numpy, independent of the module.
    "rkl": lambda r: -np.log(r),
    "softened_rkl": lambda r: (r + 1) * np.log((r + 1) / (2 * r)),
    "js": lambda r: r * np.log(r) - (r + 1) * np.log((r + 1) / 2),
    "squared_hellinger": lambda r: (np.sqrt(r) - 1)**2,
    "fkl": lambda r: r * np.log(r),
    "jeffreys": lambda r: (r - 1) * np.log(r),
}


def _quadrature_divergence(theta, name):
  """D_f(p_t || q_t) = int q_t f(p_t / q_t) dx, trapezoid on [-12, 12]."""
  mu, s = theta
  y = np.linspace(-12.0, 12.0, 48001)
  v_q = s**2 + _SIGMA**2
  log_q = -0.5 * np.log(2 * np.pi * v_q) - 0.5 * (y - mu)**2 / v_q
  log_p = special.logsumexp(_teacher_logits(y), axis=-1)
  return np.trapezoid(np.exp(log_q) * NP_F[name](np.exp(log_p - log_q)), y)


@pytest.fixture(scope="module")
def stratified_normals():
  """Equal-weight (z, e) grid: 1024 normal quantiles each, product 2^20.

  A deterministic quasi-Monte-Carlo rule (midpoint in probability, rescaled
  to unit second moment): its error is ~1e-3 here, far below plain MC.
  """
  n = 1024
  q = stats.norm.ppf((np.arange(n) + 0.5) / n)
  q /= np.sqrt(np.mean(q**2))
  z, e = np.meshgrid(q, q, indexing="ij")
  return jnp.asarray(z.ravel(), jnp.float32), jnp.asarray(e.ravel(),
                                                          jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_theorem1_gradient_matches_quadrature(name, stratified_normals):
  """(x.size / B) * grad_theta loss == grad_theta D_f(p_t || q_t).

  The reference is central finite differences (step 1e-5, float64) of a
  quadrature of D_f(p||q) = E_q[f(p/q)], independent of the loss code.
  Tolerance 5e-3 absolute: the quasi-MC error measured at ~1.1e-3; a wrong h,
  sign or scale changes the gradients by > 0.05.
  """
  z, e = stratified_normals
  got = np.asarray(_loss_grad_theta(jnp.asarray(_THETA, jnp.float32), name, z,
                                    e))  # x has shape [B, 1]: x.size / B = 1
  step = 1e-5
  want = np.array([(_quadrature_divergence(_THETA + step * d, name) -
                    _quadrature_divergence(_THETA - step * d, name)) /
                   (2 * step) for d in np.eye(2)])
  np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)


# ----------------------------------------------------------------------------
# Two-stage normalisation, on one device and on a sharded batch.


def test_normalisation_stages_against_numpy():
  """Stage 1: mean r = 1 per populated bin; stage 2: mean h = 1."""
  _, _, _, log_r, sigma = _batch(4, b=64, logit_std=4.0)
  idx = np.asarray(losses.sigma_bin_indices(jnp.asarray(sigma), 6, spacing="log"))
  normed, st = losses.normalize_log_ratio(jnp.asarray(log_r), jnp.asarray(idx),
                                          6)
  r = np.exp(np.asarray(normed, np.float64))
  want_log_h, _, want_idx, want_bin = _np_log_weight(log_r, sigma, "js",
                                                     num_bins=6)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(np.asarray(st["bin_count"]),
                                np.bincount(want_idx, minlength=6))
  for k in np.unique(idx):
    np.testing.assert_allclose(r[idx == k].mean(), 1.0, rtol=1e-5)  # f32
  np.testing.assert_allclose(np.asarray(st["bin_log_mean_ratio"]), want_bin,
                             rtol=1e-5, atol=1e-5)
  log_h, _ = _log_weight(jnp.asarray(log_r), jnp.asarray(sigma),
                                        divergence="js", num_bins=6)
  np.testing.assert_allclose(np.exp(np.asarray(log_h, np.float64)).mean(), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(log_h), want_log_h, rtol=1e-4,
                             atol=1e-4)


def _sharded_run(mesh, args, name):
  sharding = NamedSharding(mesh, P("data"))
  args = [jax.device_put(a, sharding) for a in args]

  @jax.jit
  def run(x, dt, df, log_r, sigma):
    return _grad_x(x, dt, df, log_r, sigma, divergence=name, num_bins=4)

  (loss, aux), g = run(*args)
  return float(loss), jax.tree.map(np.asarray, aux), np.asarray(g)


@pytest.mark.parametrize("name", ["fkl", "softened_rkl"])
def test_normalisation_is_global_under_sharding(name):
  """1 device vs 8 devices (batch sharded): same numbers, equal to numpy."""
  chex.assert_devices_available(8, "cpu")        # conftest: 8 simulated CPU devices
  args = _batch(5, b=64, shape=(2, 4), logit_std=4.0)
  one = _sharded_run(Mesh(np.array(jax.devices()[:1]), ("data",)), args, name)
  eight = _sharded_run(Mesh(np.array(jax.devices()), ("data",)), args, name)
  np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
  np.testing.assert_allclose(one[2], eight[2], rtol=1e-5, atol=1e-12)
  for key in one[1]:
    np.testing.assert_allclose(one[1][key], eight[1][key], rtol=1e-5,
                               err_msg=key)
  x, dt, df, log_r, sigma = args
  log_h, _, idx, bin_log_mean = _np_log_weight(log_r, sigma, name, num_bins=4)
  w = np.exp(log_h) / np.abs(x - dt).mean(axis=(1, 2))
  want = w[:, None, None] * (df - dt) / x.size
  np.testing.assert_allclose(eight[2], want, rtol=1e-4, atol=1e-12)  # f32
  # A per-device (8-example slice) normalisation would give other numbers.
  local = np.concatenate([
      _np_log_weight(log_r[i:i + 8], sigma[i:i + 8], name, num_bins=4)[0]
      for i in range(0, 64, 8)])
  assert np.max(np.abs(local - log_h)) > 0.1
  np.testing.assert_allclose(eight[1]["bin_count"],
                             np.bincount(idx, minlength=4))
  np.testing.assert_allclose(eight[1]["bin_log_mean_ratio"], bin_log_mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eight[1]["h_mean"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(eight[1]["log_ratio_std"], log_r.std(), rtol=1e-5)


# ----------------------------------------------------------------------------
# Extreme logits and clamps.

_EXTREME = np.array([1e4, -1e4, 80.0, -80.0, 1e4, 1e4, -1e4, 0.0, 88.0, -88.0,
                     1e4, -1e4, 3.0, -1e4, 80.0, 1e4], np.float32)


def _extreme_loss_grad(args, name, tw, nr, nw, clip):
  x, dt, df, log_r, sigma = args
  return _grad_x(x, dt, df, log_r, sigma, divergence=name, time_weighting=tw,
                 normalize_ratio=nr, normalize_weight=nw, num_bins=3,
                 logit_clip=clip)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_give_finite_loss_and_gradient(name):
  x, dt, df, _, _ = _batch(6, b=16, shape=(2, 2))
  sigma = np.array([0.002, 0.01, 0.5, 80.0] * 4, np.float32)
  args = (x, dt, df, _EXTREME, sigma)
  configs = [("dmd", True, True, None), ("none", True, False, None),
             ("dmd", False, True, None), ("none", False, False, 30.0)]
  if name in ("rkl", "softened_rkl", "js"):  # bounded h: safe without clamps
    configs.append(("none", False, False, None))
  for tw, nr, nw, clip in configs:
    (loss, aux), g = _extreme_loss_grad(args, name, tw, nr, nw, clip)
    assert np.isfinite(float(loss)), (tw, nr, nw, clip)
    assert np.all(np.isfinite(np.asarray(g))), (tw, nr, nw, clip)
    assert np.isfinite(float(aux["h_max"])), (tw, nr, nw, clip)


def test_logit_clip_equals_clipped_input():
  x, dt, df, _, sigma = _batch(7, b=8)
  log_r = np.array([1e4, -1e4, 2.0, -2.0, 9.0, -9.0, 0.0, 1e4], np.float32)
  kw = dict(divergence="jeffreys", num_bins=2)
  _, g = _grad_x(x, dt, df, log_r, sigma, logit_clip=5.0, **kw)
  _, want = _grad_x(x, dt, df, np.clip(log_r, -5, 5), sigma, **kw)
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6)


def test_ratio_clip_against_numpy():
  """fkl (h = r), no normalisation: weight is clip(r, lo, hi)."""
  x, dt, df, _, sigma = _batch(8, b=8)
  log_r = np.array([1e4, -1e4, 2.0, -2.0, 0.5, -0.5, 0.0, 30.0], np.float32)
  _, g = _grad_x(x, dt, df, log_r, sigma, divergence="fkl",
                 time_weighting="none", normalize_ratio=False,
                 normalize_weight=False, ratio_clip=(0.2, 5.0))
  h = np.exp(np.clip(log_r.astype(np.float64), np.log(0.2), np.log(5.0)))
  want = (h / sigma**2)[:, None, None, None] * (df - dt) / x.size
  np.testing.assert_allclose(np.asarray(g), want, rtol=2e-4, atol=1e-9)


def test_custom_divergence_in_loss_matches_builtin():
  """A custom h = r/(r+1) gives the same gradient as the built-in 'js'."""
  x, dt, df, log_r, sigma = _batch(9, b=8)
  custom = divergences.custom_divergence("my_js", h=lambda r: r / (r + 1.0))
  _, g = _grad_x(x, dt, df, log_r, sigma, divergence=custom)
  h = np.exp(_np_log_weight(log_r, sigma, "js")[0])
  want = (h / np.abs(x - dt).mean(axis=(1, 2, 3)))[:, None, None, None]
  np.testing.assert_allclose(np.asarray(g), want * (df - dt) / x.size,
                             rtol=1e-4, atol=1e-10)


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("change,match", [
    ({"dt": np.zeros((8, 3, 4, 5), np.float32)}, "denoised_teacher"),
    ({"df": np.zeros((7, 3, 4, 4), np.float32)}, "denoised_fake"),
    ({"log_r": np.zeros((8, 1), np.float32)}, "log_ratio"),
    ({"sigma": np.ones((4,), np.float32)}, "sigma"),
    ({"sigma": np.ones((8, 3), np.float32)}, "sigma"),
    ({"time_weighting": "sds"}, "time_weighting"),
    ({"divergence": "kl"}, "fkl"),
])
def test_bad_inputs_raise_clear_errors(change, match):
  x, dt, df, log_r, sigma = _batch(10)
  kw = dict(dt=dt, df=df, log_r=log_r, sigma=sigma, divergence="js",
            time_weighting="dmd")
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    losses.fdistill_generator_loss(
        x, kw["dt"], kw["df"], kw["log_r"], kw["sigma"],
        divergence=kw["divergence"], time_weighting=kw["time_weighting"])


# ----------------------------------------------------------------------------
# Fake score, GAN, R1 and samplers.


def test_fake_score_loss_edm_weighting():
  x, dt, _, _, sigma = _batch(11)
  got = losses.fake_score_loss(jnp.asarray(dt), jnp.asarray(x),
                               jnp.asarray(sigma.reshape(-1, 1, 1, 1)))
  lam = (sigma**2 + 0.25) / (sigma * 0.5)**2  # EDM, sigma_data = 0.5
  want = lam * ((dt - x)**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="target"):
    losses.fake_score_loss(jnp.asarray(dt), jnp.asarray(x[:4]),
                           jnp.asarray(sigma))


def test_gan_losses():
  rng = np.random.default_rng(12)
  real, fake = (rng.normal(size=(8, 1)).astype(np.float32) * 5 for _ in "ab")
  np.testing.assert_allclose(
      np.asarray(losses.gan_generator_loss(jnp.asarray(fake))),
      np.logaddexp(0, -fake[:, 0]), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(losses.gan_discriminator_loss(jnp.asarray(real),
                                               jnp.asarray(fake))),
      np.logaddexp(0, -real[:, 0]) + np.logaddexp(0, fake[:, 0]), rtol=1e-5)
  with pytest.raises(ValueError, match="fake_logits"):
    losses.gan_discriminator_loss(jnp.asarray(real), jnp.asarray(fake[:4]))


def test_r1_penalty_per_example():
  """logit(x) = sum(w * x^2): gradient 2 w x, squared norm per example."""
  rng = np.random.default_rng(13)
  x = rng.normal(size=(4, 3, 2)).astype(np.float32)
  w = rng.normal(size=(3, 2)).astype(np.float32)
  logit_fn = lambda x: jnp.sum(w * x**2, axis=(1, 2))
  want = ((2 * w * x)**2).sum(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(losses.r1_penalty(logit_fn, x)), want,
                             rtol=1e-5)


def test_karras_sigmas_formula_and_order():
  got = np.asarray(losses.karras_sigmas(1000))
  ramp = np.linspace(0, 1, 1000)
  want = (0.002**(1 / 7) + ramp * (80.0**(1 / 7) - 0.002**(1 / 7)))**7
  np.testing.assert_allclose(got, want, rtol=1e-5)  # float32
  np.testing.assert_allclose(got[[0, -1]], [0.002, 80.0], rtol=1e-5)


def test_sample_sigma_karras_index_range():
  table = np.asarray(losses.karras_sigmas(1000))
  s = np.asarray(losses.sample_sigma_karras(jax.random.key(0), (20000,),
                                            min_index=20, max_index=980))
  idx = np.abs(s[:, None] - table[None, 15:985]).argmin(axis=1) + 15
  np.testing.assert_allclose(s, table[idx], rtol=1e-6)
  assert idx.min() == 20 and idx.max() == 980  # inclusive, as in DMD2
  # Uniform on 961 indices: each index has ~20.8 draws; chi-square p > 1e-4.
  counts = np.bincount(idx - 20, minlength=961)
  assert stats.chisquare(counts).pvalue > 1e-4
  with pytest.raises(ValueError, match="max_index"):
    losses.sample_sigma_karras(jax.random.key(0), (4,), max_index=1000)


def test_sample_sigma_lognormal_moments():
  s = np.asarray(losses.sample_sigma_lognormal(jax.random.key(1), (100000,)))
  # log sigma ~ N(-1.2, 1.2^2): standard errors 0.004 (mean), 0.003 (std).
  np.testing.assert_allclose(np.log(s).mean(), -1.2, atol=0.02)
  np.testing.assert_allclose(np.log(s).std(), 1.2, atol=0.02)


# ----------------------------------------------------------------------------
# FastGen's clamps and running per-bin mean (issue: the recipe, items 4 and 5).


def _np_fastgen_weight(logits, sigma, h_fn, num_bins, lo=0.1, hi=20.0, bins=None, rate=0.0):
  """FastGen's `_get_f_div_weighting_h`, rewritten in numpy from its description:
  clamp the logit to [-10, 10], r = exp, clamp r to [lo, hi], update the running
  per-bin mean (bins <- rate * bins + (1 - rate) * batch mean, populated bins only),
  r / bins[idx], h(r), h / mean(h). Bins: equal-width in log sigma (ours)."""
  r = np.clip(np.exp(np.clip(logits.astype(np.float64), -10, 10)), lo, hi)
  edges = np.linspace(np.log(0.002), np.log(80.0), num_bins + 1)
  idx = np.clip(np.digitize(np.log(sigma), edges) - 1, 0, num_bins - 1)
  bins = np.ones(num_bins) if bins is None else bins.copy()
  for k in np.unique(idx):
    bins[k] = rate * bins[k] + (1 - rate) * r[idx == k].mean()
  h = h_fn(r / bins[idx])
  return h / h.mean(), bins


def _ess(h):
  return h.sum()**2 / (len(h) * np.sum(h**2))


@pytest.mark.parametrize("name, h_fn", [("fkl", lambda r: r), ("js", lambda r: r / (1 + r)),
                                        ("jeffreys", lambda r: 1 + r)])
def test_clamps_come_before_the_bin_normalisation(name, h_fn):
  """Logit clip, then ratio clip, then stage 1, as FastGen: equal to the numpy
  rewrite to 1e-5 (float32), for logits wide enough that the clamps bind."""
  rng = np.random.default_rng(11)
  logits = (3.0 * rng.normal(size=512)).astype(np.float32)
  logits[:4] = [1e4, -1e4, 15.0, -15.0]
  sigma = np.exp(rng.uniform(np.log(0.002), np.log(80.0), 512)).astype(np.float32)
  log_h, _ = _log_weight(jnp.asarray(logits), jnp.asarray(sigma),
                                        divergence=name, num_bins=10, logit_clip=10.0,
                                        ratio_clip=(0.1, 20.0))
  want, _ = _np_fastgen_weight(logits, sigma, h_fn, 10)
  np.testing.assert_allclose(np.exp(np.asarray(log_h, np.float64)), want, rtol=1e-5)


def test_clamps_keep_the_effective_sample_size_of_forward_kl():
  """Logits ~ N(0, 3^2), batch 2048, 10 bins: forward KL's effective sample size
  (sum h)^2 / (B sum h^2) is about a third with FastGen's clamps and order (the
  numpy rewrite gives 0.32 on this draw); clamping r after stage 1 gave 0.08, and
  no clamps 0.03."""
  rng = np.random.default_rng(0)
  logits = (3.0 * rng.normal(size=2048)).astype(np.float32)
  sigma = losses.karras_sigmas()[rng.integers(2, 999, 2048)]
  log_h, _ = _log_weight(jnp.asarray(logits), sigma, divergence="fkl",
                                        logit_clip=10.0, ratio_clip=(0.1, 20.0))
  h = np.exp(np.asarray(log_h, np.float64))
  want, _ = _np_fastgen_weight(logits, np.asarray(sigma), lambda r: r, 10)
  np.testing.assert_allclose(_ess(h), _ess(want), rtol=1e-4)
  assert _ess(h) > 0.25, _ess(h)
  unclamped = np.exp(np.asarray(_log_weight(
      jnp.asarray(logits), sigma, divergence="fkl")[0], np.float64))
  assert _ess(unclamped) < 0.1, _ess(unclamped)


def test_running_bin_mean_follows_fastgen_over_batches():
  """Three batches with ratio_ema_rate = 0.5: the returned running means and the
  weights equal FastGen's recursion (numpy) at each step; empty bins keep their
  value; rate 0 is the plain per-batch stage 1."""
  rng = np.random.default_rng(5)
  ema, bins = None, None
  for step in range(3):
    logits = (2.0 * rng.normal(size=64)).astype(np.float32)
    sigma = np.exp(rng.uniform(np.log(0.002), np.log(1.0), 64)).astype(np.float32)  # low bins only
    log_h, st = _log_weight(
        jnp.asarray(logits), jnp.asarray(sigma), divergence="js", num_bins=6,
        logit_clip=10.0, ratio_clip=(0.1, 20.0), ratio_ema_rate=0.5, log_ratio_ema=ema)
    want_h, bins = _np_fastgen_weight(logits, sigma, lambda r: r / (1 + r), 6, bins=bins,
                                      rate=0.5)
    ema = st["log_ratio_ema"]
    np.testing.assert_allclose(np.exp(np.asarray(ema, np.float64)), bins, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(log_h, np.float64)), want_h, rtol=1e-5)
  assert np.all(np.asarray(ema)[4:] == 0.0)       # sigma > 1 never drawn: still 1
  plain = _log_weight(jnp.asarray(logits), jnp.asarray(sigma), divergence="js",
                                     num_bins=6, ratio_ema_rate=0.0, log_ratio_ema=ema)[0]
  np.testing.assert_allclose(np.asarray(plain), np.asarray(_log_weight(
      jnp.asarray(logits), jnp.asarray(sigma), divergence="js", num_bins=6)[0]), rtol=1e-6)
  with pytest.raises(ValueError, match="ratio_ema_rate"):
    _log_weight(jnp.asarray(logits), jnp.asarray(sigma), divergence="js",
                               ratio_ema_rate=1.0)


def test_linear_bins_are_fastgens_bins_of_sigma():
  """bin_spacing='linear': idx = floor((sigma - smin) / ((smax - smin) / n)), clipped
  (FastGen's bins of t = sigma); the weights then follow the numpy rewrite."""
  rng = np.random.default_rng(9)
  sigma = np.asarray(losses.karras_sigmas())[rng.integers(2, 999, 256)]
  idx = np.asarray(losses.sigma_bin_indices(jnp.asarray(sigma), 10, spacing="linear"))
  want = np.clip(np.floor((sigma - 0.002) / ((80.0 - 0.002) / 10)), 0, 9).astype(int)
  np.testing.assert_array_equal(idx, want)
  assert np.mean(idx == 0) > 0.5          # every sigma < 8 shares the first bin
  logits = (2.0 * rng.normal(size=256)).astype(np.float32)
  log_h, st = losses.fdistill_log_weight(jnp.asarray(logits), jnp.asarray(sigma),
                                         divergence="fkl", bin_spacing="linear",
                                         logit_clip=10.0, ratio_clip=(0.1, 20.0))
  r = np.clip(np.exp(logits.astype(np.float64)), 0.1, 20.0)
  means = np.array([r[want == k].mean() if np.any(want == k) else 1.0 for k in range(10)])
  h = r / means[want]
  np.testing.assert_allclose(np.exp(np.asarray(log_h, np.float64)), h / h.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="bin spacing"):
    losses.sigma_bin_indices(jnp.asarray(sigma), 10, spacing="cubic")


# ----------------------------------------------------------------------------
# chex: shapes and dtypes of every divergence's loss, weights and gradients;
# jit and no-jit agree with the independent references; no retracing.


class GeneratorLossChexTest(chex.TestCase):
  """Every divergence through `fdistill_generator_loss` and `fdistill_log_weight`, run
  both under jax.jit and eagerly (chex.variants); each variant must match the numpy
  references above at the tolerances of the numerical tests (float32)."""

  B, SHAPE, BINS = 8, (3, 4, 4), 4

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_loss_weights_and_gradient_shapes_dtypes_and_values(self, name):
    x, dt, df, log_r, sigma = _batch(20, b=self.B, shape=self.SHAPE)

    @self.variant
    def loss_and_grad(x, dt, df, log_r, sigma):
      fn = lambda x: losses.fdistill_generator_loss(
          x, dt, df, log_r, sigma, divergence=name, num_bins=self.BINS, **LOG_BINS)
      return jax.value_and_grad(fn, has_aux=True)(x)

    @self.variant
    def log_weight(log_r, sigma):
      return losses.fdistill_log_weight(log_r, sigma, divergence=name, num_bins=self.BINS,
                                        **LOG_BINS)

    (loss, aux), g = loss_and_grad(x, dt, df, log_r, sigma)
    log_h, stats = log_weight(log_r, sigma)
    chex.assert_shape(loss, ())
    chex.assert_shape(g, x.shape)
    chex.assert_shape(log_h, (self.B,))
    chex.assert_shape([aux["h_min"], aux["h_mean"], aux["h_max"], aux["log_ratio_std"]], ())
    chex.assert_shape([stats["bin_count"], stats["bin_log_mean_ratio"]], (self.BINS,))
    chex.assert_type([loss, g, log_h, aux["h_mean"], stats["bin_log_mean_ratio"]], jnp.float32)
    chex.assert_tree_all_finite((loss, g, log_h, aux))
    # Independent: the two-stage normalisation in numpy, DMD2's time weight.
    want_log_h = _np_log_weight(log_r, sigma, name, num_bins=self.BINS)[0]
    chex.assert_trees_all_close(log_h, want_log_h.astype(np.float32), rtol=1e-5, atol=1e-5)
    w = np.exp(want_log_h) / np.abs(x - dt).mean(axis=(1, 2, 3))
    want = (w[:, None, None, None] * (df - dt) / x.size).astype(np.float32)
    chex.assert_trees_all_close(g, want, rtol=1e-4, atol=1e-10)
    chex.assert_trees_all_close(aux["h_mean"], np.float32(1.0), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_gradient_contract_matches_the_closed_form(self, name):
    """No normalisation, no time weighting: d loss / d x_i = h_i (D_fake - D_teacher)_i /
    (sigma_i^2 x.size), h from NP_LOG_H (tolerance of test_gradient_contract_*)."""
    x, dt, df, log_r, sigma = _batch(21)
    grad = self.variant(jax.grad(
        lambda x: losses.fdistill_generator_loss(
            x, dt, df, log_r, sigma, divergence=name, time_weighting="none",
            normalize_ratio=False, normalize_weight=False)[0]))
    g = grad(x)
    chex.assert_shape(g, x.shape)
    chex.assert_type(g, jnp.float32)
    h = np.exp(NP_LOG_H[name](log_r.astype(np.float64)))
    want = ((h / sigma**2)[:, None, None, None] * (df - dt) / x.size).astype(np.float32)
    chex.assert_trees_all_close(g, want, rtol=2e-4, atol=1e-9)

  def test_jit_and_eager_agree(self):
    """The same loss, gradient and weights jitted and eagerly, every divergence: equal to
    float32 round-off (rtol 1e-6; XLA may fuse and reorder the sums)."""
    x, dt, df, log_r, sigma = _batch(22, b=self.B, shape=self.SHAPE)
    for name in NAMES:
      fn = lambda x, name=name: losses.fdistill_generator_loss(
          x, dt, df, log_r, sigma, divergence=name, num_bins=self.BINS)
      eager = jax.value_and_grad(fn, has_aux=True)(x)
      jitted = jax.jit(jax.value_and_grad(fn, has_aux=True))(x)
      chex.assert_trees_all_equal_shapes_and_dtypes(eager, jitted)
      chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-12)

  def test_no_retracing_across_batches_of_one_shape(self):
    """A jitted generator step is traced once per divergence, whatever the values: new
    batches of the same shapes and dtypes must reuse the trace."""
    chex.clear_trace_counter()

    @functools.partial(jax.jit, static_argnames="name")
    @chex.assert_max_traces(n=len(NAMES))
    def step(x, dt, df, log_r, sigma, name):
      fn = lambda x: losses.fdistill_generator_loss(x, dt, df, log_r, sigma, divergence=name,
                                                    num_bins=self.BINS)
      return jax.grad(fn, has_aux=True)(x)

    for seed in range(3):
      for name in NAMES:
        g, _ = step(*_batch(30 + seed, b=self.B, shape=self.SHAPE), name=name)
        chex.assert_shape(g, (self.B,) + self.SHAPE)
    with self.assertRaises(AssertionError):        # the guard itself fires on a new shape
      step(*_batch(40, b=2 * self.B, shape=self.SHAPE), name="js")


class OtherLossesChexTest(chex.TestCase):
  """Fake score, GAN and R1 losses: per-example shapes, dtypes, jit = eager = numpy."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_example_losses(self):
    x, dt, _, _, sigma = _batch(23)
    fake = self.variant(losses.fake_score_loss)(jnp.asarray(dt), jnp.asarray(x),
                                                jnp.asarray(sigma.reshape(-1, 1, 1, 1)))
    chex.assert_shape(fake, (8,))
    chex.assert_type(fake, jnp.float32)
    lam = (sigma**2 + 0.25) / (sigma * 0.5)**2
    chex.assert_trees_all_close(fake, lam * ((dt - x)**2).mean(axis=(1, 2, 3)), rtol=1e-5)
    rng = np.random.default_rng(24)
    real, fk = (rng.normal(size=(8, 1)).astype(np.float32) * 5 for _ in "ab")
    gen = self.variant(losses.gan_generator_loss)(jnp.asarray(fk))
    disc = self.variant(losses.gan_discriminator_loss)(jnp.asarray(real), jnp.asarray(fk))
    chex.assert_shape([gen, disc], (8,))
    chex.assert_type([gen, disc], jnp.float32)
    chex.assert_trees_all_close(gen, np.logaddexp(0, -fk[:, 0]), rtol=1e-5)
    chex.assert_trees_all_close(disc, np.logaddexp(0, -real[:, 0]) + np.logaddexp(0, fk[:, 0]),
                                rtol=1e-5)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    xr = rng.normal(size=(4, 3, 2)).astype(np.float32)
    r1 = self.variant(lambda v: losses.r1_penalty(
        lambda y: jnp.sum(w * y**2, axis=(1, 2)), v))(jnp.asarray(xr))
    chex.assert_shape(r1, (4,))
    chex.assert_trees_all_close(r1, ((2 * w * xr)**2).sum(axis=(1, 2)), rtol=1e-5)
def test_given_bin_ids_replace_the_binning_of_sigma():
  """`bin_ids` (e.g. bins of the DDPM timestep, `train.noise.bin_indices`) is used as
  given: equal to binning sigma when it holds those bins, different when it does not."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray((2.0 * rng.normal(size=64)).astype(np.float32))
  sigma = jnp.asarray(np.exp(rng.uniform(np.log(0.002), np.log(80.0), 64)).astype(np.float32))
  ids = losses.sigma_bin_indices(sigma, 4, spacing="log")
  want = _log_weight(logits, sigma, divergence="js", num_bins=4)[0]
  got = losses.fdistill_log_weight(logits, sigma, divergence="js", num_bins=4, bin_ids=ids)[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  other = losses.fdistill_log_weight(logits, sigma, divergence="js", num_bins=4,
                                     bin_ids=jnp.zeros((64,), jnp.int32))[0]
  assert np.max(np.abs(np.asarray(other) - np.asarray(want))) > 1e-2
  with pytest.raises(ValueError, match="bin_ids has shape"):
    losses.fdistill_log_weight(logits, sigma, divergence="js", num_bins=4,
                               bin_ids=jnp.zeros((63,), jnp.int32))
