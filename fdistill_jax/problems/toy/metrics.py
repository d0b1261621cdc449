"""Measures of toy samples against the exact mixture teacher.

Mode coverage (per-mode captured mass, modes covered, off-mode fraction),
k-NN precision and recall, and smoothed f-divergence estimates (a kernel
density estimate of the samples against the exactly smoothed teacher).
Divergences follow the f-distill convention D_f(p || q) = E_q[f(p / q)].
"""

import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences
from fdistill_jax.metrics import distances as eval_metrics

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
  return {name: div.f for name, div in divergences.DIVERGENCES.items()}


def toy_metrics(mixture, samples, rng, *, smoothing=0.1, k=3,
                fs: Optional[Mapping[str, Callable]] = None):
  """All toy metrics of generated `samples` [N, 2] against the exact teacher.

  Mode coverage (`mode_coverage`), k-NN precision/recall against N teacher
  samples drawn with `rng` (`fdistill_jax.eval_metrics.precision_recall`), and
  the smoothed divergence estimates (`smoothed_divergences`) for every f in
  the divergence registry (or `fs`), over the finite samples. Returns
  JSON-serialisable floats/lists; if at most k samples are finite, precision,
  recall and the divergences are None/absent instead of raising.
  """
  samples = np.asarray(samples, np.float32)
  metrics = mode_coverage(mixture, samples)
  finite = samples[np.all(np.isfinite(samples), axis=-1)]
  metrics["divergence_smoothing"] = float(smoothing)
  if len(finite) <= k:  # A diverged generator: report what can be measured, None elsewhere.
    metrics.update(precision=None, recall=None, kl_estimator_bias=None)
    return metrics
  real, _ = mixture.sample(rng, len(samples))
  precision, recall = eval_metrics.precision_recall(np.asarray(real), finite, k=k)
  metrics.update(precision=float(precision), recall=float(recall))
  metrics.update(smoothed_divergences(mixture, finite, _registry_fs() if fs is None else fs,
                                      smoothing=smoothing))
  metrics["kl_estimator_bias"] = kde_divergence_bias(mixture, len(finite), smoothing)
  return metrics
