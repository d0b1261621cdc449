"""The f-divergences of f-distill and their weighting functions.

f-distill (Xu, Nie, Vahdat, 2025) minimises D_f(p || q) = E_q[f(p / q)] between
the teacher distribution p and the one-step student q, both diffused to noise
level sigma. Theorem 1 of the paper shows that its gradient is the score
difference weighted by

  h(r) = f''(r) r^2,    r = p_teacher(x_t) / q_student(x_t),

so a divergence enters training only through h. In practice r comes from a
discriminator whose logit estimates log r; every weight here is therefore a
function of the log ratio and is computed in log space (`log_h(log_r)`), which
is finite, with finite gradients, for every finite float32 logit (including
+-1e4). Only `Divergence.h`, which exponentiates, can saturate: to +inf where
the true h exceeds the float32 range (`fkl` and `jeffreys` beyond log r ~ 88, or
`squared_hellinger` beyond ~ 178); the generator loss avoids this by normalising
in log space (see `fdistill_jax.losses`).

The table (Table 1 of the paper), as `DIVERGENCES`:

  name               f(r)                              h(r)
  rkl                -log r                            1
  softened_rkl       (r+1) log((r+1)/(2r))             1 / (r+1)
  js                 r log r - (r+1) log((r+1)/2)      r / (r+1)
  squared_hellinger  (sqrt(r) - 1)^2                   sqrt(r) / 2
  fkl                r log r                           r
  jeffreys           (r-1) log r                       r + 1

This module depends only on jax and numpy.
"""

import dataclasses
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Divergence:
  """An f-divergence, described by its weighting function in log space.

  Attributes:
    name: registry key or user-chosen name.
    log_h: maps log r to log h(r), h(r) = f''(r) r^2 (Theorem 1). Must be
      elementwise; may return -inf where h(r) = 0.
    f: the generator f(r) of D_f(p||q) = E_q[f(p/q)], as a function of r, or
      None. Only needed to evaluate the divergence itself; training uses h
      alone (Proposition 1: any non-negative h defines a valid f).
  """
  name: str
  log_h: ArrayFn
  f: Optional[ArrayFn] = None

  def h(self, log_r: Array) -> Array:
    """The weight h(r) = f''(r) r^2 at r = exp(log_r); may overflow to +inf."""
    return jnp.exp(self.log_h(log_r))


def _xlogx(r):
  """r log r with the limit 0 at r = 0."""
  return jnp.where(r > 0, r * jnp.log(jnp.where(r > 0, r, 1.0)), 0.0)


def _f_rkl(r):
  return -jnp.log(r)


def _f_softened_rkl(r):
  return (r + 1.0) * jnp.log((r + 1.0) / (2.0 * r))


def _f_js(r):
  return _xlogx(r) - (r + 1.0) * jnp.log((r + 1.0) / 2.0)


def _f_squared_hellinger(r):
  return (jnp.sqrt(r) - 1.0) ** 2


def _f_fkl(r):
  return _xlogx(r)


def _f_jeffreys(r):
  return (r - 1.0) * jnp.log(r)


DIVERGENCES: dict[str, Divergence] = {
    "rkl": Divergence("rkl", jnp.zeros_like, _f_rkl),
    "softened_rkl": Divergence(
        "softened_rkl", lambda u: -jax.nn.softplus(u), _f_softened_rkl),
    "js": Divergence("js", jax.nn.log_sigmoid, _f_js),
    "squared_hellinger": Divergence(
        "squared_hellinger", lambda u: 0.5 * u - np.log(2.0),
        _f_squared_hellinger),
    "fkl": Divergence("fkl", lambda u: u, _f_fkl),
    "jeffreys": Divergence("jeffreys", jax.nn.softplus, _f_jeffreys),
}


def get_divergence(name_or_divergence: Union[str, Divergence]) -> Divergence:
  """Returns a `Divergence` from `DIVERGENCES` by name, or passes one through.

  Args:
    name_or_divergence: a key of `DIVERGENCES` or a `Divergence` (for example
      from `custom_divergence`).

  Raises:
    ValueError: for an unknown name; the message lists the valid names.
  """
  if isinstance(name_or_divergence, Divergence):
    return name_or_divergence
  if name_or_divergence not in DIVERGENCES:
    raise ValueError(
        f"Unknown divergence {name_or_divergence!r}; expected one of "
        f"{sorted(DIVERGENCES)}, or a Divergence built with "
        "custom_divergence(...).")
  return DIVERGENCES[name_or_divergence]


def custom_divergence(name: str,
                      *,
                      log_h: Optional[ArrayFn] = None,
                      h: Optional[ArrayFn] = None,
                      f: Optional[ArrayFn] = None) -> Divergence:
  """Builds a divergence from a non-negative weighting h (Proposition 1).

  Proposition 1 of the paper: every non-negative h defines a convex f with
  f''(r) = h(r) / r^2 (unique up to an affine term, fixed by f(1) = f'(1) = 0),
  hence a valid f-divergence whose generator gradient is weighted by h. So f is
  optional: pass it only if you want to evaluate D_f itself.

  Give exactly one of `log_h` (preferred: a function of log r, stays finite for
  extreme logits) or `h` (a function of r; it is evaluated at r = exp(log_r),
  so it is only as robust as `h` itself at large or tiny r, and log 0 = -inf is
  allowed where h vanishes).

  Args:
    name: a name for logging.
    log_h: log r -> log h(r), elementwise.
    h: r -> h(r) >= 0, elementwise.
    f: optional r -> f(r).

  Returns:
    A `Divergence`.

  Raises:
    ValueError: if not exactly one of `log_h`, `h` is given, or if h is
      negative or NaN on a probe grid of log r in [-20, 20].
  """
  if (log_h is None) == (h is None):
    raise ValueError(
        f"custom_divergence({name!r}): give exactly one of log_h= (a function "
        "of log r) or h= (a function of r).")
  if h is not None:
    _check_non_negative(name, h)
    ratio_h = h
    log_h = lambda u: jnp.log(ratio_h(jnp.exp(u)))
  else:
    _check_log_h(name, log_h)
  return Divergence(name, log_h, f)


def _check_non_negative(name, h):
  probe = np.asarray(h(jnp.exp(jnp.linspace(-20.0, 20.0, 81))))
  if np.any(np.isnan(probe)) or np.any(probe < 0):
    raise ValueError(
        f"custom_divergence({name!r}): h must be non-negative and not NaN "
        "(Proposition 1), but h(r) < 0 or NaN somewhere on r in "
        "[e^-20, e^20]. Fix h, or pass log_h instead.")


def _check_log_h(name, log_h):
  probe = np.asarray(log_h(jnp.linspace(-20.0, 20.0, 81)))
  if np.any(np.isnan(probe)) or np.any(probe == np.inf):
    raise ValueError(
        f"custom_divergence({name!r}): log_h returned NaN or +inf on log r in "
        "[-20, 20]; it must return a real number or -inf (h = 0).")


def clip_log_ratio(log_r: Array,
                   *,
                   logit_clip: Optional[float] = None,
                   ratio_clip: Union[float, Sequence[float], None] = None
                   ) -> Array:
  """Optional clamps on the log density ratio (off when both are None).

  Not needed for numerical safety (every `log_h` is finite for finite input);
  offered because other implementations (e.g. NVIDIA FastGen) clamp the
  discriminator output to limit the variance of the weight.

  Args:
    log_r: log density ratio (discriminator logit).
    logit_clip: c > 0: clip log_r to [-c, c].
    ratio_clip: (lo, hi) with 0 < lo < hi: clip r = exp(log_r) to [lo, hi],
      applied in log space; a single number c > 1 means (1/c, c).

  Returns:
    The clipped log ratio.
  """
  if logit_clip is not None:
    if logit_clip <= 0:
      raise ValueError(f"logit_clip must be positive, got {logit_clip}.")
    log_r = jnp.clip(log_r, -logit_clip, logit_clip)
  if ratio_clip is not None:
    if np.ndim(ratio_clip) == 0:
      if ratio_clip <= 1:
        raise ValueError(
            f"A scalar ratio_clip c means (1/c, c) and needs c > 1, got "
            f"{ratio_clip}; pass a pair (lo, hi) for other ranges.")
      ratio_clip = (1.0 / ratio_clip, ratio_clip)
    lo, hi = ratio_clip
    if not 0 < lo < hi:
      raise ValueError(
          f"ratio_clip must be a pair (lo, hi) with 0 < lo < hi, got "
          f"{ratio_clip}.")
    log_r = jnp.clip(log_r, np.log(lo), np.log(hi))
  return log_r
