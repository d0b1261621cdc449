"""2-D Gaussian-mixture toy teacher, its fitted MLP, and toy metrics.

The toy demo distils an *exact* diffusion teacher: for a mixture
p = sum_k w_k N(mu_k, std^2 I), the noised density p_sigma = p * N(0, sigma^2 I)
is again a mixture (variances std^2 + sigma^2), and the ideal denoiser
D(x; sigma) = E[x0 | x_sigma = x] and the score are closed form (EDM, Karras
et al. 2022, Eq. 3: score = (D - x) / sigma^2). Unequal weights and two rare
modes make mode-seeking divergences (reverse KL, f-distill Table 1) visibly
drop modes, which `toy_metrics` measures.

Divergences follow the f-distill convention (Xu et al. 2025, Eq. 1):
D_f(p || q) = E_q[f(p / q)] with r = p_teacher / q_student; f = -log r gives
reverse KL(q || p).
"""

import dataclasses
import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdistill_jax import losses
from fdistill_jax.networks import mlp


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """Isotropic Gaussian mixture p(x) = sum_k w_k N(x; mu_k, std^2 I).

  Hashable (by value), so it can be a linen attribute or a static jit argument.
  Methods take x [B, D] and sigma as a scalar or [B], and are jittable.

  Attributes:
    means: [K, D] component means.
    weights: [K] positive weights (normalised to sum to 1).
    std: component standard deviation (shared).
  """
  means: np.ndarray
  weights: np.ndarray
  std: float

  def __post_init__(self):
    means = np.array(self.means, np.float32)
    weights = np.array(self.weights, np.float64)
    if means.ndim != 2 or weights.shape != (means.shape[0],):
      raise ValueError(f"expected means [K, D] and weights [K], got {means.shape} and "
                       f"{weights.shape}; pass one weight per mean.")
    if np.any(weights <= 0) or not self.std > 0:
      raise ValueError(f"weights and std must be positive, got weights={weights}, "
                       f"std={self.std}; drop zero-weight components.")
    weights = (weights / weights.sum()).astype(np.float32)
    means.setflags(write=False)
    weights.setflags(write=False)
    object.__setattr__(self, "means", means)
    object.__setattr__(self, "weights", weights)
    object.__setattr__(self, "std", float(self.std))

  def _key(self):
    return (self.means.tobytes(), self.weights.tobytes(), self.means.shape, self.std)

  def __eq__(self, other):
    return isinstance(other, GaussianMixture) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def num_components(self):
    return self.means.shape[0]

  def _log_joint(self, x, sigma, class_labels=None):
    """log w_k + log N(x; mu_k, (std^2 + sigma^2) I): [B, K], and the variance [B, 1]."""
    x = jnp.asarray(x, jnp.result_type(float))  # float64 only under jax.enable_x64.
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
    var = (self.std**2 + sigma**2)[:, None]
    sq = jnp.sum((x[:, None, :] - self.means[None]) ** 2, axis=-1)
    log_norm = 0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var)
    log_joint = jnp.log(self.weights)[None] - sq / (2 * var) - log_norm
    if class_labels is not None:
      labels = jnp.asarray(class_labels, jnp.float32)
      log_joint = log_joint + jnp.where(labels > 0, jnp.log(jnp.maximum(labels, 1e-30)), -jnp.inf)
    return log_joint, var

  def log_density(self, x, sigma):
    """log p_sigma(x) [B], p_sigma = p convolved with N(0, sigma^2 I), exact."""
    log_joint, _ = self._log_joint(x, sigma)
    return jax.nn.logsumexp(log_joint, axis=-1)

  def responsibilities(self, x, sigma, class_labels=None):
    """Posterior P(component k | x_sigma = x) [B, K] (optionally given one-hot labels)."""
    return jax.nn.softmax(self._log_joint(x, sigma, class_labels)[0], axis=-1)

  def denoise(self, x, sigma, class_labels=None):
    """Exact posterior mean E[x0 | x_sigma = x] [B, D].

    Per component, E[x0 | x, k] = mu_k + std^2 / (std^2 + sigma^2) (x - mu_k);
    mixing with the responsibilities gives
    D = (std^2 x + sigma^2 sum_k gamma_k mu_k) / (std^2 + sigma^2).
    Responsibilities use a log-sum-exp softmax: stable for sigma in [1e-3, 1e2].
    `class_labels` [B, K] (one-hot over components) restricts the posterior.
    """
    log_joint, var = self._log_joint(x, sigma, class_labels)
    gamma = jax.nn.softmax(log_joint, axis=-1)
    return (self.std**2 * x + (var - self.std**2) * (gamma @ self.means)) / var

  def score(self, x, sigma):
    """grad_x log p_sigma(x) = sum_k gamma_k (mu_k - x) / (std^2 + sigma^2) [B, D]."""
    log_joint, var = self._log_joint(x, sigma)
    gamma = jax.nn.softmax(log_joint, axis=-1)
    return (gamma @ self.means - x) / var

  def sample(self, rng, n):
    """n samples x [n, D] from p, and their component indices [n] (int32)."""
    rng_k, rng_x = jax.random.split(rng)
    index = jax.random.categorical(rng_k, jnp.log(self.weights), shape=(n,))
    noise = jax.random.normal(rng_x, (n, self.means.shape[1]))
    return jnp.asarray(self.means)[index] + self.std * noise, index.astype(jnp.int32)


def default_mixture():
  """The demo teacher: 8 modes on a unit ring with skewed weights, plus 2 rare modes.

  Ring weights fall from 0.22 to 0.05 around the ring; the rare modes (weight
  0.02 each) sit at the centre and outside the ring between ring modes 0 and 1
  (radius 1.6). std = 0.08 (ring spacing 0.77 is ~10 std, so modes are
  well separated). Per-coordinate data std is about 0.7, close to EDM's
  sigma_data = 0.5.
  """
  angles = 2 * np.pi * np.arange(8) / 8
  ring = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  outer = 1.6 * np.array([[np.cos(np.pi / 8), np.sin(np.pi / 8)]])
  means = np.concatenate([ring, np.zeros((1, 2)), outer])
  weights = [0.22, 0.18, 0.15, 0.12, 0.10, 0.08, 0.06, 0.05, 0.02, 0.02]
  return GaussianMixture(means=means, weights=np.array(weights), std=0.08)


def _noised_batch(mixture, rng, batch, p_mean, p_std):
  rng_x, rng_s, rng_n = jax.random.split(rng, 3)
  x0, _ = mixture.sample(rng_x, batch)
  sigma = losses.sample_sigma_lognormal(rng_s, (batch,), p_mean, p_std)
  return x0 + sigma[:, None] * jax.random.normal(rng_n, x0.shape), sigma


def _weighted_error(model, params, mixture, x, sigma):
  """Per-example EDM-weighted error lambda(sigma) |D_theta - D_exact|^2 (EDM Eq. 8)."""
  sd = model.sigma_data
  weight = losses.edm_loss_weight(sigma, sd)
  diff = model.apply({"params": params}, x, sigma) - mixture.denoise(x, sigma)
  return weight * jnp.sum(diff**2, axis=-1)


def fit_denoiser(mixture, rng, *, steps=2000, batch=512, width=128, depth=4, lr=2e-3,
                 sigma_data=0.5, p_mean=-1.2, p_std=1.2):
  """Fits `ToyDenoiser(width, depth, sigma_data=sigma_data)` to the exact denoiser.

  Regresses on the exact D(x; sigma) (no noisy target, so much lower variance
  than the denoising loss) with EDM's log-normal sigma and weighting (EDM
  Sec. 5, Eq. 8); Adam with cosine decay; the whole loop is one jitted
  `lax.scan`.

  Returns:
    variables {'params': ...} for `mlp.ToyDenoiser(width=width, depth=depth,
    sigma_data=sigma_data)`.
  """
  model = mlp.ToyDenoiser(width=width, depth=depth, sigma_data=sigma_data)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss_fn(params, rng):
    x, sigma = _noised_batch(mixture, rng, batch, p_mean, p_std)
    return jnp.mean(_weighted_error(model, params, mixture, x, sigma))

  def step(carry, rng):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(rng):
    rng_init, rng_steps = jax.random.split(rng)
    params = model.init(rng_init, jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  jax.random.split(rng_steps, steps))
    return params

  return {"params": run(rng)}


def denoiser_error(model, variables, mixture, rng, *, n=8192, p_mean=-1.2, p_std=1.2):
  """Relative EDM-weighted error of a denoiser against the exact one.

  E[lambda |D_theta - D|^2] / E[lambda |c_skip x - D|^2] over EDM's training
  distribution of (x_sigma, sigma): 0 is exact, 1 is no better than the
  skip connection alone (an untrained ToyDenoiser with zero output layer).
  """
  x, sigma = _noised_batch(mixture, rng, n, p_mean, p_std)
  err = _weighted_error(model, variables["params"], mixture, x, sigma)
  sd = model.sigma_data
  c_skip = mlp.edm_precond_coefficients(sigma, sd)[0]
  weight = losses.edm_loss_weight(sigma, sd)
  base = weight * jnp.sum((c_skip[:, None] * x - mixture.denoise(x, sigma)) ** 2, axis=-1)
  return float(jnp.mean(err) / jnp.mean(base))


def exact_teacher(mixture, trunk_variables, trunk=None):
  """(ExactTeacher module, variables): the toy teacher in the image-teacher form.

  Args:
    mixture: the GaussianMixture.
    trunk_variables: variables of a ToyDenoiser (e.g. from `fit_denoiser`);
      its hidden activations become the teacher features.
    trunk: that ToyDenoiser module (default: ToyDenoiser() with the default
      width/depth used by `fit_denoiser`).
  """
  module = mlp.ExactTeacher(mixture=mixture, trunk=trunk or mlp.ToyDenoiser())
  return module, {"params": {"trunk": trunk_variables["params"]}}


# ---------------------------------------------------------------------------
# Metrics.

COVERED_FRACTION = 0.2   # A mode is covered if it gets >= 20% of its expected mass.
RADIUS_STDS = 3.0        # Samples within 3 std of their nearest mode are assigned to it.


def mode_coverage(mixture, samples, *, radius_stds=RADIUS_STDS, covered_fraction=COVERED_FRACTION):
  """Per-mode captured mass, modes covered and off-mode fraction.

  Each sample goes to its nearest mean if within `radius_stds * std`, else
  'off-mode' (non-finite samples are off-mode too). In 2-D a true sample
  lands within r std of its own mean with probability 1 - exp(-r^2 / 2)
  (0.989 for r = 3), so the expected captured mass of mode k under the
  teacher is w_k (1 - exp(-r^2 / 2)); mode k is *covered* if its captured
  mass is at least `covered_fraction` of that.
  """
  samples = np.asarray(samples, np.float64)
  finite = np.all(np.isfinite(samples), axis=-1)
  dist = np.linalg.norm(np.where(finite[:, None], samples, 0)[:, None] - mixture.means[None], axis=-1)
  nearest = np.argmin(dist, axis=-1)
  on_mode = finite & (dist[np.arange(len(samples)), nearest] <= radius_stds * mixture.std)
  k = mixture.num_components
  mass = np.bincount(nearest[on_mode], minlength=k) / max(len(samples), 1)
  expected = mixture.weights.astype(np.float64) * (1 - math.exp(-radius_stds**2 / 2))
  covered = mass >= covered_fraction * expected
  return {
      "mode_weights": mixture.weights.astype(np.float64).tolist(),
      "mode_mass": mass.tolist(),
      "mode_mass_expected": expected.tolist(),
      "mode_covered": [bool(c) for c in covered],
      "modes_covered": int(covered.sum()),
      "num_modes": int(k),
      "off_mode_fraction": float(1 - on_mode.mean()) if len(samples) else 1.0,
      "nonfinite_fraction": float(1 - finite.mean()) if len(samples) else 0.0,
  }


def _divergence_grid(mixture, smoothing):
  """Square quadrature grid (axes x, y and cell area) covering p_s."""
  width = math.sqrt(mixture.std**2 + smoothing**2)
  lo = mixture.means.min(axis=0).astype(np.float64) - 7 * width
  hi = mixture.means.max(axis=0).astype(np.float64) + 7 * width
  step = width / 4  # Riemann sums of Gaussians this wide are accurate to << 1e-6.
  axes = [np.arange(l, h + step, step) for l, h in zip(lo, hi)]
  return axes[0], axes[1], step**2


def _log_kde(points, samples, smoothing, rows):
  """log (1/N sum_i N(points; samples_i, s^2 I)) [G], in row chunks of the grid."""
  s2 = smoothing**2
  sq_samples = jnp.sum(samples**2, axis=-1)

  def chunk(p):
    sq = jnp.sum(p**2, -1)[:, None] - 2 * p @ samples.T + sq_samples[None]
    return jax.nn.logsumexp(-jnp.maximum(sq, 0) / (2 * s2), axis=-1)

  out = jax.lax.map(chunk, points.reshape(rows, -1, 2))
  return out.reshape(-1) - math.log(samples.shape[0]) - math.log(2 * math.pi * s2)


def kde_divergence_bias(mixture, n, smoothing, f2_at_1=1.0):
  """Approximate bias of `smoothed_divergences` when the samples come from p itself.

  With q_hat = q_s (1 + eps), E[eps] = 0, the integrand expands as
  q_s (-f'(1) eps + f''(1) eps^2 / 2); the linear term integrates to 0, and
  Var q_hat(x) = (q_{s/sqrt2}(x) / (4 pi s^2) - q_s(x)^2) / N in 2-D, so
  bias ~= f''(1) / (2N) (int q_{s/sqrt2} / (4 pi s^2 q_s) dx - 1)
       ~= f''(1) / (2N) (K (std^2 + s^2)^2 / s^4 - 1)
  for K well-separated modes (each contributes (std^2+s^2)^2 / s^4).
  """
  b = mixture.std**2 + smoothing**2
  return f2_at_1 / (2 * n) * (mixture.num_components * b**2 / smoothing**4 - 1)


def smoothed_divergences(mixture, samples, fs: Mapping[str, Callable] = None, *, smoothing=0.1):
  """Estimates D_f(p_s || q_s) = int q_s f(p_s / q_s) for each f, plus both KLs.

  Estimator: p_s = p * N(0, s^2 I) is exact; q_s is the Gaussian kernel
  estimate q_hat(x) = 1/N sum_i N(x; x_i, s^2 I), unbiased pointwise for
  q * N(0, s^2 I). The integral is a Riemann sum on a grid of spacing
  sqrt(std^2 + s^2) / 4 covering the modes +- 7 kernel widths, computed in
  log space and float64. D_f is convex in q, so the estimate is biased
  upward (Jensen); for q = p the bias is `kde_divergence_bias` (~3e-3 for
  KL with the default mixture, s = 0.1, N = 4096). log(p/q) is clipped to
  +-300 before f (only where q has no sample within ~25 kernel widths; then
  the value is a lower bound); the two KLs are computed unclipped. Sample
  mass off the grid is reported as `grid_mass_missing` and is not counted.

  Args:
    mixture: the teacher p.
    samples: [N, 2] generated samples (non-finite rows are dropped).
    fs: {name: f} with f(r) the f-divergence generator (r = p / q).
    smoothing: s.

  Returns:
    dict with 'f_div/<name>' for each f, 'reverse_kl' = KL(q_s || p_s),
    'forward_kl' = KL(p_s || q_s), 'grid_mass_missing', all floats.
  """
  samples = np.asarray(samples, np.float64)
  samples = samples[np.all(np.isfinite(samples), axis=-1)]
  if not len(samples):
    raise ValueError("smoothed_divergences got no finite samples; check the generator output.")
  xs, ys, area = _divergence_grid(mixture, smoothing)
  points = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
  with jax.enable_x64(True):
    points, samples = jnp.asarray(points), jnp.asarray(samples)
    log_p = mixture.log_density(points, smoothing)
    log_q = _log_kde(points, samples, smoothing, len(xs))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    out = {"reverse_kl": jnp.sum(q * (log_q - log_p)) * area,
           "forward_kl": jnp.sum(p * (log_p - log_q)) * area,
           "grid_mass_missing": 1 - jnp.sum(q) * area}
    r = jnp.exp(jnp.clip(log_p - log_q, -300, 300))
    for name, f in (fs or {}).items():
      out[f"f_div/{name}"] = jnp.sum(q * f(r)) * area
    return {k: float(v) for k, v in out.items()}


def _registry_fs():
  """{name: f} from fdistill_jax.divergences.DIVERGENCES."""
  from fdistill_jax import divergences  # pylint: disable=g-import-not-at-top
  return {name: div.f for name, div in divergences.DIVERGENCES.items()}


def toy_metrics(mixture, samples, rng, *, smoothing=0.1, k=3,
                fs: Optional[Mapping[str, Callable]] = None):
  """All toy metrics of generated `samples` [N, 2] against the exact teacher.

  Mode coverage (`mode_coverage`), k-NN precision/recall against N teacher
  samples drawn with `rng` (`fdistill_jax.evaluate.precision_recall`), and
  the smoothed divergence estimates (`smoothed_divergences`) for every f in
  the divergence registry (or `fs`), over the finite samples. Returns
  JSON-serialisable floats/lists; if at most k samples are finite, precision,
  recall and the divergences are None/absent instead of raising.
  """
  from fdistill_jax import evaluate  # pylint: disable=g-import-not-at-top
  samples = np.asarray(samples, np.float32)
  metrics = mode_coverage(mixture, samples)
  finite = samples[np.all(np.isfinite(samples), axis=-1)]
  metrics["divergence_smoothing"] = float(smoothing)
  if len(finite) <= k:  # A diverged generator: report what can be measured, None elsewhere.
    metrics.update(precision=None, recall=None, kl_estimator_bias=None)
    return metrics
  real, _ = mixture.sample(rng, len(samples))
  precision, recall = evaluate.precision_recall(np.asarray(real), finite, k=k)
  metrics.update(precision=float(precision), recall=float(recall))
  metrics.update(smoothed_divergences(mixture, finite, _registry_fs() if fs is None else fs,
                                      smoothing=smoothing))
  metrics["kl_estimator_bias"] = kde_divergence_bias(mixture, len(finite), smoothing)
  return metrics
