"""Tests of fdistill_jax.divergences against independent closed forms."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import divergences

NAMES = ["rkl", "softened_rkl", "js", "squared_hellinger", "fkl", "jeffreys"]

# log h(r) as a function of u = log r, written independently in numpy from
# h = f'' r^2 of the paper's Table 1 (float64, overflow-free forms).
NP_LOG_H = {
    "rkl": lambda u: np.zeros_like(u),
    "softened_rkl": lambda u: -np.logaddexp(0.0, u),  # 1 / (r + 1)
    "js": lambda u: -np.logaddexp(0.0, -u),  # r / (r + 1)
    "squared_hellinger": lambda u: 0.5 * u - np.log(2.0),  # sqrt(r) / 2
    "fkl": lambda u: u,  # r
    "jeffreys": lambda u: np.logaddexp(0.0, u),  # r + 1
}
EXTREME = np.array([-1e4, -1e3, -88.0, -80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0,
                    80.0, 88.0, 1e3, 1e4], np.float32)


def test_registry_has_the_six_divergences_of_table_1():
  assert sorted(divergences.DIVERGENCES) == sorted(NAMES)
  for name, div in divergences.DIVERGENCES.items():
    assert div.name == name


@pytest.mark.parametrize("name", NAMES)
def test_h_equals_r2_second_derivative_of_f(name):
  """h(r) == r^2 f''(r), f'' by jax.grad(jax.grad(f)), on r in [1e-3, 1e3]."""
  div = divergences.get_divergence(name)
  with jax.enable_x64(True):
    r = jnp.logspace(-3.0, 3.0, 61, dtype=jnp.float64)
    f2 = jax.vmap(jax.grad(jax.grad(div.f)))(r)
    expected = np.asarray(r**2 * f2)
    got = np.asarray(div.h(jnp.log(r)))
  # float64 autodiff vs closed form: agree to rounding (rtol 1e-9).
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_f_vanishes_at_one(name):
  """f(1) = 0 so that D_f(p || p) = 0 (independent fact of f-divergences)."""
  f = divergences.get_divergence(name).f
  np.testing.assert_allclose(float(f(jnp.float32(1.0))), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_log_h_finite_and_exact_for_extreme_logits(name):
  """log_h and its gradient are finite (float32) for logits up to +-1e4."""
  log_h = divergences.get_divergence(name).log_h
  u = jnp.asarray(EXTREME)
  got = np.asarray(log_h(u))
  grad = np.asarray(jax.vmap(jax.grad(log_h))(u))
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
  # float32 vs float64 closed form: relative 1e-6 plus absolute 1e-5.
  np.testing.assert_allclose(got, NP_LOG_H[name](EXTREME.astype(np.float64)),
                             rtol=1e-6, atol=1e-5)


def test_h_values_in_ratio_space():
  """h at a few ratios against hand-computed values of Table 1."""
  r = np.array([0.25, 1.0, 4.0])
  expected = {
      "rkl": [1.0, 1.0, 1.0],
      "softened_rkl": [0.8, 0.5, 0.2],
      "js": [0.2, 0.5, 0.8],
      "squared_hellinger": [0.25, 0.5, 1.0],
      "fkl": [0.25, 1.0, 4.0],
      "jeffreys": [1.25, 2.0, 5.0],
  }
  for name, want in expected.items():
    got = divergences.get_divergence(name).h(jnp.log(jnp.asarray(r)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)  # float32


def test_get_divergence_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    divergences.get_divergence("kl_forward")
  for name in NAMES:
    assert name in str(err.value)
  assert "kl_forward" in str(err.value)


def test_get_divergence_passes_instances_through():
  div = divergences.custom_divergence("mine", log_h=lambda u: 0.25 * u)
  assert divergences.get_divergence(div) is div


def test_custom_divergence_from_h_matches_log_h_form():
  """Proposition 1: a custom h (here r/(r+1), i.e. JS) used via r or log r."""
  from_h = divergences.custom_divergence("js_h", h=lambda r: r / (r + 1.0))
  from_log = divergences.custom_divergence(
      "js_log", log_h=lambda u: -jnp.logaddexp(0.0, -u))
  u = jnp.linspace(-30.0, 30.0, 121)
  want = NP_LOG_H["js"](np.asarray(u, np.float64))
  np.testing.assert_allclose(np.asarray(from_h.log_h(u)), want, rtol=1e-5,
                             atol=1e-5)  # float32, exp/log round trip
  np.testing.assert_allclose(np.asarray(from_log.log_h(u)), want, rtol=1e-6,
                             atol=1e-6)
  assert from_h.f is None


@pytest.mark.parametrize("kwargs", [
    {},
    {"h": lambda r: r, "log_h": lambda u: u},
    {"h": lambda r: r - 1.0},  # negative for r < 1
    {"log_h": lambda u: jnp.full_like(u, jnp.nan)},
])
def test_custom_divergence_rejects_bad_input(kwargs):
  with pytest.raises(ValueError, match="custom_divergence"):
    divergences.custom_divergence("bad", **kwargs)


def test_clip_log_ratio():
  u = np.array([-1e4, -3.0, -0.5, 0.0, 0.7, 3.0, 1e4], np.float32)
  np.testing.assert_array_equal(
      np.asarray(divergences.clip_log_ratio(jnp.asarray(u), logit_clip=2.0)),
      np.clip(u, -2.0, 2.0))
  got = divergences.clip_log_ratio(jnp.asarray(u), ratio_clip=(0.5, 4.0))
  np.testing.assert_allclose(np.asarray(got),
                             np.clip(u, np.log(0.5), np.log(4.0)), rtol=1e-6)
  got = divergences.clip_log_ratio(jnp.asarray(u), ratio_clip=4.0)
  np.testing.assert_allclose(np.asarray(got),
                             np.clip(u, -np.log(4.0), np.log(4.0)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(divergences.clip_log_ratio(u)), u)
  with pytest.raises(ValueError, match="ratio_clip"):
    divergences.clip_log_ratio(jnp.asarray(u), ratio_clip=0.5)
  with pytest.raises(ValueError, match="logit_clip"):
    divergences.clip_log_ratio(jnp.asarray(u), logit_clip=-1.0)
  with pytest.raises(ValueError, match="ratio_clip"):
    divergences.clip_log_ratio(jnp.asarray(u), ratio_clip=(2.0, 1.0))


class DivergenceChexTest(chex.TestCase):
  """log h and h of every divergence: shapes, dtypes, jit = eager = the closed forms."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_log_h_and_its_gradient(self, name):
    """float32 in, float32 out, the input's shape; values and d log h / du against the
    float64 closed forms (rtol 1e-6 + atol 1e-5, as test_log_h_finite_*; the gradient
    against a central difference of the closed form at |u| <= 20, rtol 1e-3)."""
    div = divergences.get_divergence(name)
    u = jnp.asarray(EXTREME)
    log_h = self.variant(div.log_h)(u)
    grad = self.variant(jax.vmap(jax.grad(div.log_h)))(u)
    chex.assert_shape([log_h, grad], EXTREME.shape)
    chex.assert_type([log_h, grad], jnp.float32)
    chex.assert_tree_all_finite((log_h, grad))
    chex.assert_trees_all_close(log_h, NP_LOG_H[name](EXTREME.astype(np.float64)),
                                rtol=1e-6, atol=1e-5)
    mid = np.abs(EXTREME) <= 20.0
    v, eps = EXTREME[mid].astype(np.float64), 1e-5
    want = (NP_LOG_H[name](v + eps) - NP_LOG_H[name](v - eps)) / (2 * eps)
    chex.assert_trees_all_close(grad[mid], want, rtol=1e-3, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_h_keeps_batch_shapes(self, name):
    """h maps a [2, 3] float32 array of log ratios elementwise to [2, 3] float32."""
    u = jnp.linspace(-3.0, 3.0, 6, dtype=jnp.float32).reshape(2, 3)
    h = self.variant(divergences.get_divergence(name).h)(u)
    chex.assert_shape(h, (2, 3))
    chex.assert_type(h, jnp.float32)
    chex.assert_trees_all_close(h, np.exp(NP_LOG_H[name](np.asarray(u, np.float64))),
                                rtol=1e-5)

  def test_log_h_traces_once_per_shape(self):
    chex.clear_trace_counter()
    js = divergences.get_divergence("js")
    log_h = jax.jit(chex.assert_max_traces(n=1)(lambda u: js.log_h(u)))  # pylint: disable=unnecessary-lambda
    for seed in range(3):
      log_h(jnp.asarray(np.random.default_rng(seed).normal(size=5), jnp.float32))
    with self.assertRaises(AssertionError):
      log_h(jnp.zeros((6,), jnp.float32))
