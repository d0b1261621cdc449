r"""Statistics of the f-distill weight h(r): the paper's Fig. 4(b) / 5(a) and Fig. 6 binning.

Fig. 4(b) / 5(a) of the paper compare divergences by the variance of their
weight when teacher and student differ: for two unit-variance 1-D Gaussians,
teacher p = N(mu, 1) and student q = N(0, 1), the density ratio is
r(x) = p(x) / q(x) = exp(mu x - mu^2 / 2), and the normalised variance

  Var_q[h(r)] / E_q[h(r)]^2

(the squared coefficient of variation; scale-free, so it is what remains after
the paper's stage-2 normalisation divides h by its mean) grows with mu at a
rate set by h. `normalized_weight_variance` computes it by quadrature from the
library's `log_h` (`fdistill_jax.divergences`). Closed forms, for the tests:
reverse KL (h = 1) gives 0; forward KL (h = r) exp(mu^2) - 1, since
E_q[r^k] = exp(k (k - 1) mu^2 / 2); squared Hellinger (h = sqrt(r) / 2)
exp(mu^2 / 4) - 1.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences


def normalized_weight_variance(divergence, mean_difference, num_points=20001, width=12.0):
  """Var_q[h(r)] / E_q[h(r)]^2 for p = N(mu, 1), q = N(0, 1), by the trapezoidal rule.

  The integrands q(x) h(r(x))^k (k = 1, 2) are computed in log space in float64
  on a uniform grid over [min(0, 2 mu) - width, max(0, 2 mu) + width] (it holds
  the peaks of q h and q h^2 for every divergence of the table, which lie between
  0 and 2 mu, and +- `width` standard deviations around them); the rule converges
  exponentially fast for such smooth, Gaussian-tailed integrands.

  Args:
    divergence: a name in `divergences.DIVERGENCES` or a `Divergence`.
    mean_difference: mu (a scalar).

  Returns:
    The normalised variance, a Python float.
  """
  div = divergences.get_divergence(divergence)
  mu = float(mean_difference)
  x = np.linspace(min(0.0, 2 * mu) - width, max(0.0, 2 * mu) + width, num_points)
  with jax.enable_x64(True):
    xs = jnp.asarray(x, jnp.float64)
    log_q = -0.5 * xs**2 - 0.5 * np.log(2 * np.pi)
    log_h = div.log_h(mu * xs - 0.5 * mu**2)
    def integral(k):
      values = jnp.exp(log_q + k * log_h)
      return jnp.trapezoid(values, xs)
    m1, m2 = integral(1.0), integral(2.0)
    return float(jnp.maximum(m2 / m1**2 - 1.0, 0.0))


def binned_means(x, y, num_bins=32):
  """Sorts by `x` and averages both in `num_bins` bins of (nearly) equal counts.

  Returns:
    (x bin means, y bin means, y standard errors), each [num_bins].
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < num_bins:
    raise ValueError(f"binned_means needs two 1-D arrays of the same length >= num_bins="
                     f"{num_bins}, got {x.shape} and {y.shape}.")
  order = np.argsort(x, kind="stable")
  bins = np.array_split(order, num_bins)
  xm = np.array([x[b].mean() for b in bins])
  ym = np.array([y[b].mean() for b in bins])
  se = np.array([y[b].std(ddof=1) / np.sqrt(len(b)) if len(b) > 1 else 0.0 for b in bins])
  return xm, ym, se
