"""Noise levels of the training terms, on the teacher's own clock, and their stage-1 bins.

  from fdistill_jax.train import noise_levels
  sigma = noise_levels(config, "fdistill", rng, n)     # [n] float32

The steps (`train.steps`) draw every noise level through `noise_levels`:
term 'fdistill' (the generator's f-distill and GAN terms, one teacher pass),
'fake_score' (the fake score's denoising loss) and 'gan' (the
discriminator's real and generated branches; the generator's draw when the
f-distill term is off). `loss.clock` says which clock the teacher runs on:

* 'karras' (EDM teachers, continuous sigma; the default): indices uniform on
  [loss.min_index, loss.max_index] of the loss.num_sigmas-level Karras
  schedule on [loss.sigma_min, loss.sigma_max] (`losses.sample_sigma_karras`),
  for every term; with `loss.fake_sigma='lognormal'` the fake score's levels
  are EDM's log-normal instead. These are the draws of the CIFAR-10 and
  ImageNet-64 runs, key for key.
* 'ddpm' (discrete-time teachers: SD 1.5, SDXL): DDPM timesteps t uniform on
  the term's inclusive range, `loss.t_fdistill` ([20, 980]: DMD2's
  min/max_step_percent 0.02 / 0.98 for its distribution-matching term),
  `loss.t_fake_score` and `loss.t_gan` ([0, 999]: DMD2's fake-score and GAN
  timesteps), mapped to sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) on the
  teacher's schedule `loss.ddpm` (a diffusers scheduler config:
  `pipelines.denoisers.DiscreteSchedule`). The denoiser maps sigma_t back to
  the integer t. `loss.fake_sigma='lognormal'` applies on this clock too.

Stage-1 bins (`bin_indices`) are equal-width bins of the same variable the
terms draw, as FastGen bins its own time t (`FdistillModel.
_get_f_div_weighting_h`: `loss.num_bins` bins of (t - min_t) / (max_t - min_t)
of its noise scheduler):

* EDM teachers: FastGen's t is sigma on [0.002, 80]; here sigma on
  [loss.sigma_min, loss.sigma_max], equal-width in sigma
  (`loss.bin_spacing='linear'`, the one default of `losses`) or in log sigma.
* SD 1.5 / SDXL: FastGen's t is the DDPM time t / 1000 on [0, 0.999] (its
  `AlphasNoiseSchedule`, drawn uniformly on [0.001, 0.999]), so ten bins of
  about 100 timesteps; here the integer timestep on the f-distill term's
  range, [t_lo, t_hi + 1) in `num_bins` equal widths, so a uniform draw fills
  every bin equally (within one timestep).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import losses
from fdistill_jax.pipelines import denoisers

CLOCKS = ("karras", "ddpm")
TERMS = ("fdistill", "fake_score", "gan")
T_RANGE_FIELDS = {"fdistill": "t_fdistill", "fake_score": "t_fake_score", "gan": "t_gan"}


def noise_levels(config, term, rng, n):
  """[n] float32 noise levels that `term` draws in a run of `config` (module docstring).

  Args:
    config: a resolved run config (ConfigDict or FrozenConfigDict).
    term: 'fdistill', 'fake_score' or 'gan'.
    rng: a PRNG key.
    n: number of levels (static).
  """
  if term not in TERMS:
    raise ValueError(f"noise_levels: term={term!r}; expected one of {TERMS}.")
  lc = config.loss
  if term == "fake_score" and lc.fake_sigma == "lognormal":
    return losses.sample_sigma_lognormal(rng, (n,), p_mean=lc.p_mean, p_std=lc.p_std)
  if clock(config) == "karras":
    return losses.sample_sigma_karras(
        rng, (n,), num=lc.num_sigmas, sigma_min=lc.sigma_min, sigma_max=lc.sigma_max,
        min_index=lc.min_index, max_index=lc.max_index)
  lo, hi = timestep_range(config, term)
  t = jax.random.randint(rng, (n,), lo, hi + 1)
  return jnp.asarray(schedule(config).sigmas, jnp.float32)[t]


def bin_indices(config, sigma):
  """int32 [B] stage-1 bin of each noise level (module docstring: the clock's variable)."""
  lc = config.loss
  if clock(config) == "karras":
    return losses.sigma_bin_indices(sigma, lc.num_bins, lc.sigma_min, lc.sigma_max,
                                    lc.bin_spacing)
  lo, hi = timestep_range(config, "fdistill")
  return losses.sigma_bin_indices(timesteps(config, sigma), lc.num_bins, lo, hi + 1, "linear")


def timesteps(config, sigma):
  """float32 integer DDPM timestep of each sigma on the run's `loss.ddpm` schedule (nearest)."""
  return schedule(config).sigma_to_t(sigma, "nearest")


def clock(config):
  """`loss.clock` ('karras' where the config predates it), checked."""
  name = config.loss.get("clock", "karras")
  if name not in CLOCKS:
    raise ValueError(f"loss.clock={name!r}; expected one of {CLOCKS} ('karras' for EDM "
                     "teachers, 'ddpm' for discrete-time teachers such as SD 1.5 and SDXL).")
  return name


def timestep_range(config, term):
  """(lo, hi), the inclusive DDPM timestep range `term` draws (clock 'ddpm')."""
  field = T_RANGE_FIELDS[term]
  lo, hi = (int(v) for v in config.loss[field])
  num = int(config.loss.ddpm.num_train_timesteps)
  if not 0 <= lo <= hi < num:
    raise ValueError(f"loss.{field}=({lo}, {hi}) must satisfy 0 <= lo <= hi < {num} (the "
                     "schedule's timesteps); DMD2 draws (20, 980) for the f-distill term and "
                     "(0, 999) for the fake score and the GAN.")
  return lo, hi


def schedule(config):
  """The `pipelines.denoisers.DiscreteSchedule` of `loss.ddpm` (cached per schedule)."""
  return _schedule(tuple(sorted(config.loss.ddpm.items())))


@functools.lru_cache(maxsize=8)
def _schedule(items):
  return denoisers.DiscreteSchedule.from_config(dict(items))


def check_teacher(config, teacher_sigmas):
  """Raises unless `loss.ddpm` is the teacher's own schedule (clock 'ddpm').

  `teacher_sigmas`: the discrete sigmas of the loaded teacher (its generator spec's
  'sigmas'), or None for a teacher without a discrete schedule.
  """
  if clock(config) != "ddpm":
    return
  if teacher_sigmas is None:
    raise ValueError("loss.clock='ddpm' but the teacher has no discrete schedule (an EDM "
                     "teacher?); set --config.loss.clock=karras.")
  want = np.asarray(teacher_sigmas, np.float64)
  got = schedule(config).sigmas
  if want.shape != got.shape or not np.allclose(got, want, rtol=1e-4):
    raise ValueError(
        f"loss.ddpm ({dict(config.loss.ddpm.items())}) is not the teacher's schedule ({want.size} "
        f"levels, sigma {want[0]:.4g} .. {want[-1]:.4g}; loss.ddpm gives {got.size}, "
        f"{got[0]:.4g} .. {got[-1]:.4g}); set loss.ddpm to the teacher's "
        "scheduler/scheduler_config.json values.")
