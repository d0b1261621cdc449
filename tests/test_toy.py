"""Tests for the toy teacher, its MLPs, metrics and plots (fdistill_jax.problems.toy, networks.mlp, plots)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from fdistill_jax import divergences
from fdistill_jax.metrics import figures as plots
from fdistill_jax.problems.toy import metrics as toy_metrics
from fdistill_jax.problems.toy import mixture as toy
from fdistill_jax.models import mlp

N = 4096


@pytest.fixture(scope="module")
def mixture():
  return toy.default_mixture()


@pytest.fixture(scope="module")
def true_samples(mixture):
  x, index = mixture.sample(jax.random.PRNGKey(0), N)
  return np.asarray(x), np.asarray(index)


def _numpy_density(mixture, x0):
  """p(x0) [M] in float64, written independently of GaussianMixture."""
  means = mixture.means.astype(np.float64)
  weights = mixture.weights.astype(np.float64)
  var = mixture.std**2
  sq = ((x0[:, None, :] - means[None]) ** 2).sum(-1)
  return (weights * np.exp(-sq / (2 * var)) / (2 * np.pi * var)).sum(-1)


def _quadrature_posterior_mean(mixture, x, sigma):
  """E[x0 | x_sigma = x] = int x0 p(x0) N(x; x0, sigma^2) / int p(x0) N(x; x0, sigma^2)."""
  if sigma < mixture.std:  # The likelihood is the narrow factor: grid around x, wide
    # enough for +-10 sigma plus the prior's pull sigma^2 / (sigma^2 + std^2) |x - mu| (<= 2.5).
    half = 10 * sigma + 2.5 * sigma**2 / (sigma**2 + mixture.std**2)
    axis = np.arange(-half, half, sigma / 20)
    axes = [x[0] + axis, x[1] + axis]
  else:  # The prior is the narrow factor: grid over its support.
    axes = [np.arange(-2.5, 2.5, mixture.std / 10)] * 2
  x0 = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
  log_lik = -((x0 - x) ** 2).sum(-1) / (2 * sigma**2)
  w = _numpy_density(mixture, x0) * np.exp(log_lik - log_lik.max())
  return (w[:, None] * x0).sum(0) / w.sum()


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 80.0])
def test_denoise_matches_quadrature(mixture, sigma):
  # On a mode, between two ring modes, near the centre, and far outside.
  points = np.array([[1.02, 0.03], [0.88, 0.4], [0.1, -0.15], [2.0, -1.5]])
  got = np.asarray(mixture.denoise(jnp.asarray(points, jnp.float32), sigma))
  want = np.stack([_quadrature_posterior_mean(mixture, x, sigma) for x in points])
  # Quadrature is exact to ~1e-8 at these spacings; tolerance covers float32 evaluation.
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
def test_density_is_normalised_and_matches_numpy(mixture, sigma):
  width = math.sqrt(mixture.std**2 + sigma**2)
  axis = np.arange(-1.6 - 8 * width, 1.6 + 8 * width, width / 4)
  grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
  density = np.exp(np.asarray(mixture.log_density(jnp.asarray(grid, jnp.float32), sigma),
                              np.float64))
  # Riemann sum of Gaussians at spacing width/4 is exact to ~1e-80; float32 log -> 1e-5.
  assert abs(density.sum() * (width / 4) ** 2 - 1) < 1e-5
  if sigma == 0.0:  # Direct float64 evaluation of the mixture, rel. tol. for float32.
    np.testing.assert_allclose(density[::97], _numpy_density(mixture, grid[::97]),
                               rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize("sigma", [0.01, 0.5, 10.0])
def test_score_is_grad_log_density(mixture, true_samples, sigma):
  x = jnp.asarray(true_samples[0][:64] + 0.1, jnp.float32)
  grad = jax.jit(jax.vmap(jax.grad(lambda xi: mixture.log_density(xi[None], sigma)[0])))(x)
  scale = 1 / (mixture.std**2 + sigma**2)  # Score magnitude ~ distance / variance.
  np.testing.assert_allclose(mixture.score(x, sigma), grad, rtol=1e-4, atol=1e-5 * scale)
  # EDM Eq. 3: score = (D - x) / sigma^2 (loosened for float32 cancellation in D - x).
  np.testing.assert_allclose((mixture.denoise(x, sigma) - x) / sigma**2, grad,
                             rtol=1e-3, atol=2e-3 * scale)


def test_sample_frequencies_and_spread(mixture, true_samples):
  x, index = true_samples
  freq = np.bincount(index, minlength=mixture.num_components) / N
  binomial_std = np.sqrt(mixture.weights * (1 - mixture.weights) / N)
  assert np.all(np.abs(freq - mixture.weights) < 4 * binomial_std)
  residual = x - mixture.means[index]
  assert abs(residual.std() - mixture.std) < 0.05 * mixture.std  # 8192 values: ~1% std error.


def test_mixture_is_hashable_by_value():
  a, b = toy.default_mixture(), toy.default_mixture()
  assert a == b and hash(a) == hash(b)
  with pytest.raises(ValueError, match="positive"):
    toy.GaussianMixture(means=np.zeros((2, 2)), weights=np.array([1.0, 0.0]), std=0.1)


# ---------------------------------------------------------------------------
# Networks.

def test_toy_denoiser_preconditioning_and_features():
  net = mlp.ToyDenoiser(width=16, depth=3, sigma_data=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
  sigma = jnp.array([0.002, 0.1, 0.5, 2.0, 80.0])
  variables = jax.jit(net.init)(jax.random.PRNGKey(0), x, sigma)
  # The output layer starts at zero, so D = c_skip x with c_skip = sd^2 / (sigma^2 + sd^2).
  want = 0.25 / (sigma**2 + 0.25)
  np.testing.assert_allclose(net.apply(variables, x, sigma), want[:, None] * x, rtol=1e-6)
  out, feats = net.apply(variables, x, sigma, feature_resolutions=(0, 2))
  assert out.shape == (5, 2) and sorted(feats) == [0, 2]
  assert all(f.shape == (5, 16) for f in feats.values())
  with pytest.raises(ValueError, match="hidden-layer"):
    net.apply(variables, x, sigma, feature_resolutions=(3,))


def test_toy_denoiser_class_conditioning():
  net = mlp.ToyDenoiser(width=16, depth=2, label_dim=4, label_dropout=1.0)
  x, sigma = jnp.ones((3, 2)), jnp.ones((3,))
  labels = jax.nn.one_hot(jnp.array([0, 1, 3]), 4)
  variables = net.init(jax.random.PRNGKey(0), x, sigma, labels)
  params = jax.tree.map(lambda p: p + 0.1, variables)  # Make the output layer non-zero.
  dropped = net.apply(params, x, sigma, labels, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  unlabelled = net.apply(params, x, sigma, jnp.zeros_like(labels))
  np.testing.assert_allclose(dropped, unlabelled, rtol=1e-6)  # Dropout 1.0 zeroes every label.
  with pytest.raises(ValueError, match="class_labels"):
    net.apply(params, x, sigma)


def _fit_error(mixture, model, variables, sigma):
  """EDM-weighted mean squared error against the exact denoiser at one sigma."""
  x0, _ = mixture.sample(jax.random.PRNGKey(7), 2048)
  x = x0 + sigma * jax.random.normal(jax.random.PRNGKey(8), x0.shape)
  s = jnp.full((x.shape[0],), sigma)
  diff = model.apply(variables, x, s) - mixture.denoise(x, s)
  c_out2 = sigma**2 * 0.25 / (sigma**2 + 0.25)
  return float(jnp.mean(jnp.sum(diff**2, -1)) / c_out2)


def test_fit_denoiser_approximates_exact_denoiser(mixture):
  model = mlp.ToyDenoiser(width=64, depth=3)
  variables = toy.fit_denoiser(mixture, jax.random.PRNGKey(0), steps=600, batch=256,
                               width=64, depth=3, lr=3e-3)
  # EDM-weighted error |D - D*|^2 / c_out^2 (the F-space error): an untrained net
  # has ~1 (the skip term alone); the fitted one must be below 0.05 at each sigma.
  for sigma in (0.05, 0.3, 1.0, 5.0):
    assert _fit_error(mixture, model, variables, sigma) < 0.05, sigma
  assert toy.denoiser_error(model, variables, mixture, jax.random.PRNGKey(3)) < 0.05


def test_exact_teacher_output_and_features(mixture, true_samples):
  trunk = mlp.ToyDenoiser(width=16, depth=3)
  x = jnp.asarray(true_samples[0][:6]) + 0.2
  sigma = jnp.array([0.002, 0.05, 0.3, 1.0, 5.0, 80.0])
  trunk_vars = jax.jit(trunk.init)(jax.random.PRNGKey(0), x, sigma)
  module, variables = toy.exact_teacher(mixture, trunk_vars, trunk=trunk)
  want = np.stack([_quadrature_posterior_mean(mixture, np.asarray(xi, np.float64), float(s))
                   for xi, s in zip(x, sigma)])
  np.testing.assert_allclose(jax.jit(module.apply)(variables, x, sigma), want, atol=2e-5)
  out, feats = module.apply(variables, x, sigma, feature_resolutions=(1, 2))
  _, trunk_feats = trunk.apply(trunk_vars, x, sigma, feature_resolutions=(1, 2))
  assert sorted(feats) == [1, 2] and all(feats[i].shape == (6, 16) for i in feats)
  np.testing.assert_allclose(feats[2], trunk_feats[2], rtol=1e-6)
  # One-hot labels over components: posterior of a single Gaussian, closed form.
  k = jnp.array([0, 3, 8, 9, 2, 5])
  got = module.apply(variables, x, sigma, jax.nn.one_hot(k, mixture.num_components))
  mu = mixture.means[np.asarray(k)]
  shrink = (mixture.std**2 / (mixture.std**2 + sigma**2))[:, None]
  np.testing.assert_allclose(got, mu + shrink * (x - mu), atol=1e-5)


# ---------------------------------------------------------------------------
# Metrics.

def _registry():
  return {name: d.f for name, d in divergences.DIVERGENCES.items()}


def test_metrics_on_true_samples(mixture, true_samples):
  n = N // 2  # Precision/recall is O(n^2); half the samples keep the test fast.
  x = true_samples[0][:n]
  metrics = toy_metrics.toy_metrics(mixture, x, jax.random.PRNGKey(1))
  json.dumps(metrics)  # Plain Python types only.
  assert metrics["modes_covered"] == mixture.num_components == metrics["num_modes"]
  inside = 1 - math.exp(-4.5)  # P(|x - mu| <= 3 std) for a 2-D Gaussian.
  expected = mixture.weights * inside
  binomial_std = np.sqrt(expected * (1 - expected) / n)
  assert np.all(np.abs(np.array(metrics["mode_mass"]) - expected) < 4 * binomial_std)
  assert abs(metrics["off_mode_fraction"] - (1 - inside)) < 4 * math.sqrt(inside * (1 - inside) / n)
  assert metrics["precision"] > 0.85 and metrics["recall"] > 0.85
  # Every D_f estimate is ~ the KDE bias f''(1)/(2N)(K (std^2+s^2)^2/s^4 - 1) (3e-3 for KL),
  # positive, with seed-to-seed spread ~30% of it: accept [0.2, 3] x the predicted bias.
  for name, f in _registry().items():
    f2 = float(jax.grad(jax.grad(f))(1.0))
    bias = toy_metrics.kde_divergence_bias(mixture, n, 0.1, f2)
    assert 0.2 * bias < metrics[f"f_div/{name}"] < 3 * bias, name
  for name in ("reverse_kl", "forward_kl"):
    assert 0.2 * metrics["kl_estimator_bias"] < metrics[name] < 3 * metrics["kl_estimator_bias"]
  assert abs(metrics["grid_mass_missing"]) < 1e-6


def test_metrics_with_one_mode_missing(mixture, true_samples):
  x, index = true_samples
  missing = 3
  cov = toy_metrics.mode_coverage(mixture, x[index != missing])
  assert cov["modes_covered"] == mixture.num_components - 1
  assert not cov["mode_covered"][missing] and sum(cov["mode_covered"]) == 9
  # q = p without mode k, renormalised: KL(q || p) = -log(1 - w_k) exactly (separated modes).
  # Tolerance 0.01: KDE bias (~3e-3) + multinomial noise of the mode masses (~1e-3).
  div = toy_metrics.smoothed_divergences(mixture, x[index != missing], {"rkl": lambda r: -jnp.log(r)})
  want = -math.log(1 - mixture.weights[missing])
  assert abs(div["reverse_kl"] - want) < 0.01 and abs(div["f_div/rkl"] - want) < 0.01
  assert div["forward_kl"] > 1.0  # Mass-covering: large for a dropped mode.


def test_metrics_with_all_mass_in_one_mode(mixture, true_samples):
  x, index = true_samples
  metrics = toy_metrics.toy_metrics(mixture, x[index == 0], jax.random.PRNGKey(2), fs=_registry())
  assert metrics["modes_covered"] == 1 and metrics["mode_covered"][0]
  # q = mode 0 alone: KL(q || p) = -log w_0 (same tolerance as above).
  assert abs(metrics["reverse_kl"] - (-math.log(mixture.weights[0]))) < 0.01
  assert metrics["recall"] < 0.35 and metrics["precision"] > 0.85  # Recall ~ w_0 = 0.22.


def test_metrics_count_off_mode_and_nonfinite(mixture):
  samples = np.array([[0.5, 0.5], [3.0, 3.0], [np.nan, 0.0], [1.0, 0.0]])
  cov = toy_metrics.mode_coverage(mixture, samples)
  assert cov["off_mode_fraction"] == 0.75 and cov["nonfinite_fraction"] == 0.25
  assert cov["mode_mass"][0] == 0.25
  diverged = toy_metrics.toy_metrics(mixture, np.full((8, 2), np.nan), jax.random.PRNGKey(0))
  assert diverged["modes_covered"] == 0 and diverged["precision"] is None
  json.dumps(diverged)


# ---------------------------------------------------------------------------
# Plots.

def test_plot_toy_writes_png(mixture, true_samples, tmp_path):
  path = tmp_path / "sub" / "toy.png"
  plots.plot_toy(str(path), mixture, {"samples": true_samples[0][:500]}, title="rkl step 0",
                 field=lambda p: np.linalg.norm(p, axis=-1), field_label="|x|", size=48)
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
    image.verify()
  assert width > 2.5 * height      # three panels side by side
  assert sorted(os.listdir(tmp_path / "sub")) == ["toy.png"]   # no temporary left


def test_toy_figure_says_grey_is_the_teacher_p_and_orange_the_generator_q(
    mixture, true_samples, tmp_path, monkeypatch):
  figs = []
  monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig) or path)
  plots.plot_toy(str(tmp_path / "t.png"), mixture, {"samples": true_samples[0][:100]}, size=16)
  (fig,) = figs
  legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
  assert legends, "the sample panels have no legend"
  texts = [t.get_text() for t in legends[0].get_texts()]
  assert texts == ["teacher p (density)", "generator q (samples)"], texts
  assert fig.axes[0].get_title() == "teacher density p"


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_layout_and_edm_quantisation(channels):
  images = np.random.default_rng(0).uniform(-1, 1, (5, 4, 6, channels)).astype(np.float32)
  images[0, 0, 0], images[1, 0, 0] = -1.0, 1.0
  grid = plots.image_grid(images, ncols=3, pad=1, pad_value=7)
  assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, channels)
  # EDM's conversion, written out independently: (x * 127.5 + 128).clip(0, 255) -> uint8.
  expected = np.clip(images * 127.5 + 128, 0, 255).astype(np.uint8)
  for i in range(5):
    r, c = divmod(i, 3)
    np.testing.assert_array_equal(grid[1 + r * 5:1 + r * 5 + 4, 1 + c * 7:1 + c * 7 + 6],
                                  expected[i])
  assert grid[0, 0, 0] == 7 and np.all(grid[6:, 15:] == 7)   # padding and the missing tile
  assert np.all(grid[1, 1] == 0) and np.all(grid[1, 8] == 255)


def test_save_image_grid_writes_png(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  path = plots.save_image_grid(images, str(tmp_path / "g.png"), labels=list(range(6)),
                               title="t")
  with Image.open(path) as image:
    assert image.format == "PNG" and min(image.size) >= 100   # enlarged, not 8x8 tiles
