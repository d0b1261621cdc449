"""Losses of f-distill: generator, fake score, GAN, R1; noise-level samplers.

References:
  f-distill: Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence
    Distribution Matching", 2025 (Theorem 1 / Eq. 4, Section 4).
  DMD2: Yin et al., "Improved Distribution Matching Distillation for Fast
    Image Synthesis", 2024 (tianweiy/DMD2).
  EDM: Karras et al., "Elucidating the Design Space of Diffusion-Based
    Generative Models", 2022.

Conventions: a batch has a leading axis of size B; "per-example" losses return
shape [B] (the mean over the non-batch axes of each example) and leave the
batch reduction to the caller. The generator loss returns a scalar (see its
docstring for why). Everything depends only on jax and numpy, and every batch
reduction is a plain jnp reduction or segment op, so under `jax.jit` with a
sharded batch (GSPMD) it is a global reduction over the whole batch.
"""

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences

Array = jax.Array
sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------
# Shape checks.


def _batch_size(x: Array) -> int:
  if x.ndim < 1:
    raise ValueError(f"x must have a leading batch axis, got shape {x.shape}.")
  return x.shape[0]


def _check_same_shape(name: str, a: Array, ref_name: str, ref: Array):
  if a.shape != ref.shape:
    raise ValueError(
        f"{name} has shape {a.shape} but {ref_name} has shape {ref.shape}; "
        "they must be equal (same batch, same example shape).")


def _per_example_sigma(sigma: Array, x: Array) -> Array:
  """Accepts sigma of shape [], [B] or [B, 1, ..., 1]; returns shape [B]."""
  sigma = jnp.asarray(sigma)
  b = x.shape[0]
  if sigma.ndim == 0:
    return jnp.broadcast_to(sigma, (b,))
  if (sigma.shape[0] != b or sigma.size != b or sigma.ndim > x.ndim):
    raise ValueError(
        f"sigma has shape {sigma.shape}; expected a scalar, [B]=[{b}] or "
        f"[{b}, 1, ...] broadcastable to x of shape {x.shape}.")
  return sigma.reshape(b)


def _expand(v: Array, x: Array) -> Array:
  """[B] -> [B, 1, ..., 1] broadcastable against x."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _mean_over_example(v: Array) -> Array:
  return jnp.mean(v, axis=tuple(range(1, v.ndim)))


# ----------------------------------------------------------------------------
# Two-stage normalisation (Section 4 of the paper).


BIN_SPACINGS = ("log", "linear")
# The one default of the stage-1 bins, here and in the engine (`loss.bin_spacing`):
# equal-width in the noise variable itself, as NVIDIA FastGen bins its time t.
DEFAULT_BIN_SPACING = "linear"


def sigma_bin_indices(sigma: Array, num_bins: int, sigma_min: float = 0.002,
                      sigma_max: float = 80.0,
                      spacing: str = DEFAULT_BIN_SPACING) -> Array:
  """Bins noise levels into `num_bins` equal-width bins of sigma (or log sigma).

  Bins cover [sigma_min, sigma_max], equal-width in sigma itself
  (`spacing='linear'`, the default: NVIDIA FastGen's bins of its time
  variable, t = sigma for EDM teachers: with 10 bins on [0.002, 80] the first
  holds every sigma < 8) or in log sigma (`'log'`). Any other noise variable
  can be binned the same way, e.g. a DDPM timestep t with 'linear' bins on
  [t_lo, t_hi + 1] (`fdistill_jax.train.noise.bin_indices`). Values outside
  the range go to the first or last bin.

  Args:
    sigma: [B] noise levels (or timesteps).
    num_bins: number of bins (>= 1).
    sigma_min, sigma_max: range of the bins, sigma_min < sigma_max, and
      0 < sigma_min for 'log'.
    spacing: 'linear' or 'log'.

  Returns:
    int32 [B] bin indices in [0, num_bins).
  """
  if spacing not in BIN_SPACINGS:
    raise ValueError(f"Unknown bin spacing {spacing!r}; expected one of {BIN_SPACINGS}.")
  lowest = 0 if spacing == "log" else -np.inf
  if num_bins < 1 or not lowest < sigma_min < sigma_max:
    raise ValueError(
        f"Need num_bins >= 1 and sigma_min < sigma_max (and 0 < sigma_min for log bins), got "
        f"num_bins={num_bins}, sigma_min={sigma_min}, sigma_max={sigma_max}.")
  if spacing == "linear":
    pos = (sigma - sigma_min) / (sigma_max - sigma_min) * num_bins
    return jnp.clip(jnp.floor(pos), 0, num_bins - 1).astype(jnp.int32)
  lo, hi = np.log(sigma_min), np.log(sigma_max)
  pos = (jnp.log(sigma) - lo) / (hi - lo) * num_bins
  return jnp.clip(jnp.floor(pos), 0, num_bins - 1).astype(jnp.int32)


def segment_log_mean_exp(values: Array, segment_ids: Array,
                         num_segments: int) -> tuple[Array, Array]:
  """log(mean(exp(values))) within each segment, without overflow.

  Args:
    values: [B] log-space values (finite or -inf).
    segment_ids: int [B] in [0, num_segments).
    num_segments: static number of segments.

  Returns:
    (log_mean, count): [num_segments] each; log_mean is 0 for empty segments.
  """
  count = jax.ops.segment_sum(jnp.ones_like(values), segment_ids, num_segments)
  top = jax.ops.segment_max(values, segment_ids, num_segments)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  total = jax.ops.segment_sum(jnp.exp(values - top[segment_ids]), segment_ids,
                              num_segments)
  populated = (count > 0) & (total > 0)
  log_mean = top + jnp.log(jnp.where(populated, total, 1.0))
  log_mean = log_mean - jnp.log(jnp.maximum(count, 1.0))
  return jnp.where(populated, log_mean, 0.0), count


def normalize_log_ratio(log_r: Array, bin_ids: Array,
                        num_bins: int) -> tuple[Array, dict[str, Array]]:
  """Stage 1 of Section 4: divide r by its mean within each sigma bin.

  Since E_q[r] = 1 at every noise level, the discriminator's ratio is
  rescaled so that its mean is exactly 1 in each populated bin. Done in log
  space: log r - log(mean_bin exp(log r)).

  Args:
    log_r: [B] log density ratios.
    bin_ids: int [B] bin of each example (`sigma_bin_indices`).
    num_bins: number of bins.

  Returns:
    (normalised log_r [B], stats) with stats `bin_log_mean_ratio` (log of the
    per-bin mean ratio before normalisation, 0 where empty) and `bin_count`.
  """
  log_mean, count = segment_log_mean_exp(log_r, bin_ids, num_bins)
  stats = {"bin_log_mean_ratio": log_mean, "bin_count": count}
  return log_r - log_mean[bin_ids], stats


def normalize_log_weight(log_h: Array) -> Array:
  """Stage 2 of Section 4: divide h by its batch mean, in log space.

  If every weight is zero (log_h = -inf everywhere) the weights stay zero.

  Args:
    log_h: [B] log weights.

  Returns:
    [B] log weights whose exponentials have mean 1 over the (global) batch.
  """
  log_mean = jax.nn.logsumexp(log_h) - jnp.log(float(log_h.shape[0]))
  return jnp.where(jnp.isfinite(log_mean), log_h - log_mean, log_h)


# ----------------------------------------------------------------------------
# The f-distill generator loss (Theorem 1 / Eq. 4).


def _time_weight_none(x, denoised_teacher, sigma, eps):
  del x, denoised_teacher, eps
  return 1.0 / sigma**2


def _time_weight_dmd(x, denoised_teacher, sigma, eps):
  del sigma
  return 1.0 / jnp.maximum(_mean_over_example(jnp.abs(x - denoised_teacher)),
                           eps)


# Per-example factor multiplying (denoised_fake - denoised_teacher).
TIME_WEIGHTINGS = {"none": _time_weight_none, "dmd": _time_weight_dmd}


def _log_ratio_stats(log_ratio: Array) -> dict[str, Array]:
  return {
      "log_ratio_mean": jnp.mean(log_ratio),
      "log_ratio_std": jnp.std(log_ratio),
      "log_ratio_min": jnp.min(log_ratio),
      "log_ratio_max": jnp.max(log_ratio),
  }


def update_log_ratio_ema(log_ratio_ema: Array, bin_log_mean: Array, count: Array,
                         rate: float) -> Array:
  """Running mean of the per-bin mean ratio, in log space (FastGen's `bins`).

  ema_k <- rate * ema_k + (1 - rate) * mean_k for every bin k holding at least
  one example of this batch; empty bins keep their value. rate = 0 is the
  batch mean alone (the paper's stage 1).

  Args:
    log_ratio_ema: [num_bins] log of the running means (zeros at the start:
      every running mean starts at 1, as FastGen's buffer of ones).
    bin_log_mean: [num_bins] log of this batch's per-bin mean ratio.
    count: [num_bins] examples per bin in this batch.
    rate: decay in [0, 1).

  Returns:
    [num_bins] updated log running means.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"ratio_ema_rate must lie in [0, 1), got {rate}.")
  if rate == 0.0:
    mixed = bin_log_mean
  else:
    mixed = jnp.logaddexp(np.log(rate) + log_ratio_ema, np.log1p(-rate) + bin_log_mean)
  return jnp.where(count > 0, mixed, log_ratio_ema)


def fdistill_log_weight(log_ratio: Array, sigma: Array, *,
                        divergence: Union[str, divergences.Divergence],
                        normalize_ratio: bool = True,
                        normalize_weight: bool = True, num_bins: int = 10,
                        sigma_min: float = 0.002, sigma_max: float = 80.0,
                        logit_clip: Optional[float] = None,
                        ratio_clip: Union[float, Sequence[float], None] = None,
                        ratio_ema_rate: float = 0.0,
                        log_ratio_ema: Optional[Array] = None,
                        bin_spacing: str = DEFAULT_BIN_SPACING,
                        bin_ids: Optional[Array] = None
                        ) -> tuple[Array, dict[str, Array]]:
  """log h(r) per example, as applied by `fdistill_generator_loss`.

  Order, as NVIDIA FastGen's `FdistillModel._get_f_div_weighting_h`: logit
  clip -> ratio clip -> stage 1 (divide r by the running mean of its per-bin
  mean) -> log h (the divergence) -> stage 2 (batch-mean weight
  normalisation). Clamping before stage 1 keeps one huge logit from setting
  its bin's mean and driving every other weight in the bin to zero.

  Args:
    log_ratio: [B] log p_teacher/q_student (discriminator logits).
    sigma: [B] noise levels (used for the bins of stage 1).
    divergence, normalize_ratio, normalize_weight, num_bins, sigma_min,
    sigma_max, logit_clip, ratio_clip, ratio_ema_rate, log_ratio_ema,
    bin_spacing, bin_ids: see `fdistill_generator_loss`.

  Returns:
    (log_h [B], stats): stats holds `bin_log_mean_ratio` (log of this batch's
    per-bin mean of the clamped r), `bin_mean_ratio` (its exponential),
    `bin_count`, and `log_ratio_ema` (the updated running log means that
    stage 1 divided by).
  """
  div = divergences.get_divergence(divergence)
  log_r = divergences.clip_log_ratio(log_ratio, logit_clip=logit_clip)
  log_r = divergences.clip_log_ratio(log_r, ratio_clip=ratio_clip)
  if bin_ids is None:
    bin_ids = sigma_bin_indices(sigma, num_bins, sigma_min, sigma_max, bin_spacing)
  elif bin_ids.shape != log_r.shape:
    raise ValueError(f"bin_ids has shape {bin_ids.shape}; expected [B]={log_r.shape} (one "
                     "stage-1 bin per example).")
  _, stats = normalize_log_ratio(log_r, bin_ids, num_bins)
  previous = jnp.zeros((num_bins,), log_r.dtype) if log_ratio_ema is None else log_ratio_ema
  if previous.shape != (num_bins,):
    raise ValueError(f"log_ratio_ema has shape {previous.shape}; expected [num_bins]="
                     f"[{num_bins}] (one running log mean per sigma bin).")
  ema = update_log_ratio_ema(previous, stats["bin_log_mean_ratio"], stats["bin_count"],
                             ratio_ema_rate)
  if normalize_ratio:
    log_r = log_r - ema[bin_ids]
  log_h = div.log_h(log_r)
  if normalize_weight:
    log_h = normalize_log_weight(log_h)
  stats["bin_mean_ratio"] = jnp.exp(stats["bin_log_mean_ratio"])
  stats["log_ratio_ema"] = ema
  return log_h, stats


def fdistill_generator_loss(
    x: Array, denoised_teacher: Array, denoised_fake: Array,
    log_ratio: Array, sigma: Array, *,
    divergence: Union[str, divergences.Divergence],
    time_weighting: str = "dmd", normalize_ratio: bool = True,
    normalize_weight: bool = True, num_bins: int = 10,
    sigma_min: float = 0.002, sigma_max: float = 80.0,
    logit_clip: Optional[float] = None,
    ratio_clip: Union[float, Sequence[float], None] = None,
    dmd_eps: float = 1e-8, ratio_ema_rate: float = 0.0,
    log_ratio_ema: Optional[Array] = None,
    bin_spacing: str = DEFAULT_BIN_SPACING,
    bin_ids: Optional[Array] = None) -> tuple[Array, dict[str, Any]]:
  """The f-distill distribution-matching loss of the generator (Eq. 4).

  Theorem 1: grad_theta D_f(p_t || q_t) = E[h(r) (s_q - s_p)(x_t) dx/dtheta],
  with scores s = (D(x_t) - x_t) / sigma^2 from the teacher (p) and fake score
  (q) denoisers. Like DMD2's 0.5 * mean((x - sg(x - g))^2), with g = w h
  (D_fake - D_teacher), the loss has this gradient w.r.t. x (it is written as
  mean(x * sg(g)) - sg(...) + sg(0.5 * mean(g^2)) so that the gradient is
  exact in floating point); the denoisers and log_ratio are stop-gradiented
  here, so only the generator (through x) receives gradient. The loss *value*
  is 0.5 * mean(g^2), as in DMD2: a diagnostic only.

  Gradient contract. The loss is a mean over all x.size elements, as in DMD2,
  so that GAN loss weights keep the paper's meaning:
    d loss / d x_i = h_i * w_i * (denoised_fake_i - denoised_teacher_i) / x.size
  per example i, where h_i is the weight after the optional normalisations and
    w_i = 1 / sigma_i^2                          (time_weighting='none'),
    w_i = 1 / max(mean|x_i - denoised_teacher_i|, dmd_eps)   ('dmd'),
  the latter being DMD2's per-example normaliser (mean over non-batch axes).
  `dmd_eps` guards the division: an example whose teacher residual is exactly
  zero gets a large finite weight 1/dmd_eps instead of inf/NaN (DMD2 uses
  nan_to_num). With divergence='rkl' (h = 1) and 'dmd', this is DMD2's
  distribution-matching gradient, whatever the normalisation flags.

  Normalisation (Section 4): stage 1 (`normalize_ratio`) divides r by its
  mean within bins of the noise level (`num_bins` equal-width bins of sigma,
  or of log sigma, on [sigma_min, sigma_max]; outliers go to the edge bins;
  or the caller's `bin_ids`, e.g. bins of the DDPM timestep) so that E_q[r] = 1 in
  each populated bin; with `ratio_ema_rate` > 0 the divisor is a running
  mean over batches (FastGen's `ratio_ema_rate`: 0 on CIFAR-10, 0.5 on
  ImageNet-64), carried by the caller in `log_ratio_ema` and returned updated
  in aux. Stage 2 (`normalize_weight`) divides h by its batch mean. Both are computed in log space and over the global batch (plain jnp
  reductions; under jit with a sharded batch GSPMD makes them global). The
  default of 10 bins suits batches of a few hundred examples; use fewer bins
  for small batches (a bin with one example always gets r = 1).

  Clamps (off by default here; the training configs turn on FastGen's
  `logit_clip=10`, `ratio_clip=(0.1, 20)`): the logit and then r are clamped
  *before* stage 1, as in FastGen. They bound the spread of h: for logits
  ~ N(0, 3^2) over a batch of 2048, forward KL's effective sample size
  (sum h)^2 / (B sum h^2) is about 33% with them and about 3% without.

  Numerics: with at least one normalisation on, the loss and its gradient are
  finite for every finite float32 logit. With both off, h is exp(log h) and
  overflows for 'fkl'/'jeffreys' when log r > ~88; use `logit_clip` or
  `ratio_clip` there.

  Args:
    x: [B, ...] generated clean samples (the only input receiving gradient).
    denoised_teacher: [B, ...] teacher denoiser output at x + sigma * eps.
    denoised_fake: [B, ...] fake-score denoiser output at the same point.
    log_ratio: [B] log p_teacher(x_t) / q_student(x_t) (discriminator logit).
    sigma: noise level per example: [B], [B, 1, ..., 1], or a scalar.
    divergence: a name in `divergences.DIVERGENCES` or a `Divergence`.
    time_weighting: 'dmd' or 'none' (`TIME_WEIGHTINGS`).
    normalize_ratio: stage-1 normalisation.
    normalize_weight: stage-2 normalisation.
    num_bins: number of stage-1 bins.
    sigma_min, sigma_max: range of the bins.
    logit_clip: optional clip of log_ratio to [-c, c] (first).
    ratio_clip: optional (lo, hi) clip of r, or c meaning (1/c, c) (after
      the logit clip, before stage 1).
    dmd_eps: floor of the DMD normaliser.
    ratio_ema_rate: decay of the running per-bin mean of stage 1, in [0, 1).
    log_ratio_ema: [num_bins] log running means from the previous call
      (None: all zero, i.e. running means of 1).
    bin_spacing: 'linear' (equal-width bins of sigma, as FastGen; the
      default) or 'log' (of log sigma); see `sigma_bin_indices`.
    bin_ids: optional int [B] stage-1 bin of each example, in [0, num_bins);
      when given, sigma_min, sigma_max and bin_spacing are not used.

  Returns:
    (loss, aux): scalar loss; aux holds h_min/h_mean/h_max (the weight
    applied), log_ratio_mean/std/min/max (of the input), per-bin
    bin_mean_ratio, bin_log_mean_ratio (of this batch, after the clamps) and
    bin_count, and log_ratio_ema (the updated running log means).
  """
  _batch_size(x)
  _check_same_shape("denoised_teacher", denoised_teacher, "x", x)
  _check_same_shape("denoised_fake", denoised_fake, "x", x)
  if log_ratio.shape != x.shape[:1]:
    raise ValueError(
        f"log_ratio has shape {log_ratio.shape}; expected [B]={x.shape[:1]} "
        "(one logit per example; squeeze a trailing axis of size 1).")
  if time_weighting not in TIME_WEIGHTINGS:
    raise ValueError(f"Unknown time_weighting {time_weighting!r}; expected "
                     f"one of {sorted(TIME_WEIGHTINGS)}.")
  sigma = _per_example_sigma(sigma, x)
  teacher, fake, log_ratio = sg(denoised_teacher), sg(denoised_fake), sg(
      log_ratio)
  log_h, stats = fdistill_log_weight(
      log_ratio, sigma, divergence=divergence, normalize_ratio=normalize_ratio,
      normalize_weight=normalize_weight, num_bins=num_bins,
      sigma_min=sigma_min, sigma_max=sigma_max, logit_clip=logit_clip,
      ratio_clip=ratio_clip, ratio_ema_rate=ratio_ema_rate,
      log_ratio_ema=None if log_ratio_ema is None else sg(log_ratio_ema),
      bin_spacing=bin_spacing, bin_ids=bin_ids)
  h = jnp.exp(log_h)
  w = TIME_WEIGHTINGS[time_weighting](sg(x), teacher, sigma, dmd_eps)
  g = _expand((h * w).astype(x.dtype), x) * (fake - teacher)
  # Same value and gradient as DMD2's 0.5 * mse(x, sg(x - g)), but the
  # gradient is exactly g / x.size: no cancellation in x - (x - g), which
  # would drop the gradient of elements with |g| < eps * |x|.
  surrogate = jnp.mean(x * g)
  loss = surrogate - sg(surrogate) + sg(0.5 * jnp.mean(g**2))
  aux = {"h_min": jnp.min(h), "h_mean": jnp.mean(h), "h_max": jnp.max(h),
         **_log_ratio_stats(log_ratio), **stats}
  return loss, aux


# ----------------------------------------------------------------------------
# Fake score, GAN and R1 losses.


def edm_loss_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
  """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


# Weight of the fake score's x0 error at sigma, for x_t = x0 + sigma n and a denoiser
# D(x_t) = x_t - sigma eps_hat: 'edm' lambda(sigma) (EDM teachers); 'x0' 1, FastGen's
# unweighted x0-MSE (`denoising_score_matching_loss` with fake_score_pred_type='x0', its SD
# configs); 'eps' 1 / sigma^2, DMD2's unweighted eps-MSE, since (eps_hat - n)^2 =
# (D - x0)^2 / sigma^2 (tianweiy/DMD2 `main/sd_guidance.py`, `compute_loss_fake`).
FAKE_SCORE_WEIGHTINGS = ("edm", "x0", "eps")


def fake_score_loss(denoised: Array, target: Array, sigma: Array,
                    sigma_data: float = 0.5, weighting: str = "edm") -> Array:
  """Per-example denoising loss of the fake score network.

  w(sigma) * mean((denoised - target)^2) over each example's elements, with
  w EDM's lambda (Karras et al. 2022, Eq. 8 / Table 1; `weighting='edm'`), 1
  ('x0', FastGen's SD recipe) or 1 / sigma^2 ('eps', DMD2's eps-MSE); see
  `FAKE_SCORE_WEIGHTINGS`. EDM sums over elements instead of averaging: the
  two differ by the constant number of elements per example. `target` is the
  (stop-gradiented) generator sample.

  Args:
    denoised: [B, ...] fake-score denoiser output at target + sigma * eps.
    target: [B, ...] clean samples.
    sigma: [B], [B, 1, ..., 1] or scalar noise levels.
    sigma_data: data standard deviation of 'edm' (EDM: 0.5).
    weighting: 'edm', 'x0' or 'eps'.

  Returns:
    [B] per-example losses.
  """
  _batch_size(denoised)
  _check_same_shape("denoised", denoised, "target", target)
  if weighting not in FAKE_SCORE_WEIGHTINGS:
    raise ValueError(f"Unknown fake-score weighting {weighting!r}; expected one of "
                     f"{FAKE_SCORE_WEIGHTINGS}.")
  sigma = _per_example_sigma(sigma, denoised)
  err = _mean_over_example((denoised - sg(target))**2)
  if weighting == "x0":
    return err
  if weighting == "eps":
    return err / sigma**2
  return edm_loss_weight(sigma, sigma_data) * err


def gan_generator_loss(fake_logits: Array) -> Array:
  """Per-example non-saturating GAN loss of the generator: softplus(-l).

  As in DMD2 and the paper's GAN term (l = discriminator logit on a generated
  sample). Non-batch axes (e.g. a trailing 1) are averaged.

  Returns:
    [B] per-example losses.
  """
  _batch_size(fake_logits)
  return _mean_over_example(jax.nn.softplus(-fake_logits))


def gan_discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """Per-example discriminator loss softplus(-l_real) + softplus(l_fake).

  The non-saturating logistic GAN loss (DMD2, f-distill). Its optimum logit
  is log p_real / q_fake, which is what f-distill uses as log r. Real and fake
  batches must have the same shape; non-batch axes are averaged.

  Returns:
    [B] per-example losses.
  """
  _batch_size(real_logits)
  _check_same_shape("real_logits", real_logits, "fake_logits", fake_logits)
  return _mean_over_example(jax.nn.softplus(-real_logits) +
                            jax.nn.softplus(fake_logits))


def r1_penalty(logit_fn, x_real: Array) -> Array:
  """Per-example R1 penalty ||d logit / d x||^2 on real data (Mescheder 2018).

  Computed as the gradient of sum(logit_fn(x_real)) w.r.t. x_real, which is
  the per-example gradient when examples do not interact inside logit_fn (no
  batch statistics). Does NOT include the factor gamma / 2: the usual term is
  gamma / 2 * mean(r1_penalty(...)).

  Args:
    logit_fn: x -> logits with leading batch axis.
    x_real: [B, ...] real samples.

  Returns:
    [B] squared gradient norms.
  """
  _batch_size(x_real)
  grads = jax.grad(lambda x: jnp.sum(logit_fn(x)))(x_real)
  return jnp.sum(grads.reshape(grads.shape[0], -1)**2, axis=-1)


def approx_r1_penalty(logits: Array, perturbed_logits: Array) -> Array:
  """Per-example approximate R1: mean((l(x) - l(x + alpha n))^2) (NVIDIA FastGen).

  A finite-difference stand-in for ||d logit / d x||^2 that needs no second
  backward pass: with x perturbed by alpha n, n ~ N(0, I), its expectation is
  about alpha^2 ||d logit / d x||^2. FastGen's `gan_r1_reg_weight` multiplies
  the batch mean of this (alpha = `gan_r1_reg_alpha`, 0.1).

  Args:
    logits: [B, ...] discriminator logits at x.
    perturbed_logits: [B, ...] logits at x + alpha n.

  Returns:
    [B] per-example penalties.
  """
  _batch_size(logits)
  _check_same_shape("perturbed_logits", perturbed_logits, "logits", logits)
  return _mean_over_example((logits - perturbed_logits)**2)


# ----------------------------------------------------------------------------
# Noise-level samplers.


def sample_sigma_lognormal(rng: Array, shape: Sequence[int],
                           p_mean: float = -1.2, p_std: float = 1.2) -> Array:
  """EDM training noise levels: log sigma ~ N(p_mean, p_std^2) (EDM Table 1)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape))


def karras_sigmas(num: int = 1000, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0) -> Array:
  """The Karras et al. (EDM Eq. 5) schedule, in ascending order.

  sigma_i = (sigma_min^(1/rho) + i/(num-1) (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho, i = 0..num-1, so index 0 is sigma_min; this is the
  order DMD2 indexes (its flipped `karras_sigmas` buffer).

  Returns:
    [num] float32 noise levels.
  """
  if num < 2:
    raise ValueError(f"num must be >= 2, got {num}.")
  ramp = jnp.linspace(0.0, 1.0, num)
  lo, hi = sigma_min**(1.0 / rho), sigma_max**(1.0 / rho)
  return (lo + ramp * (hi - lo))**rho


def check_sigma_indices(num: int, min_index: int, max_index: int) -> None:
  """Raises unless 0 <= min_index <= max_index < num (indices into `karras_sigmas`)."""
  if not (num >= 2 and 0 <= min_index <= max_index < num):
    raise ValueError(
        f"Need num >= 2 and 0 <= min_index <= max_index < num (indices into the {num}-level "
        f"Karras schedule), got min_index={min_index}, max_index={max_index}, num={num}.")


def sample_sigma_karras(rng: Array, shape: Sequence[int], *, num: int = 1000,
                        min_index: int = 0, max_index: Optional[int] = None,
                        sigma_min: float = 0.002, sigma_max: float = 80.0,
                        rho: float = 7.0) -> Array:
  """Noise levels drawn uniformly from `karras_sigmas` indices (DMD2).

  Indices are uniform on [min_index, max_index] inclusive (default: all),
  as DMD2 draws timesteps in [min_step, max_step] with min/max_step_percent.

  Returns:
    float32 noise levels of the given shape.
  """
  max_index = num - 1 if max_index is None else max_index
  check_sigma_indices(num, min_index, max_index)
  idx = jax.random.randint(rng, shape, min_index, max_index + 1)
  return karras_sigmas(num, sigma_min, sigma_max, rho)[idx]
