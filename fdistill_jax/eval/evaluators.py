"""Evaluators: periodic work on the generator, called by the loop as `evaluator(params, step)`.

The training loop builds the evaluators `config.eval.evaluators` names from
`EVALUATORS` once, with an `EvalContext` (the run's static pieces), and calls
each at its own period and after the last iteration. An evaluator receives
`params` (a dict: 'generator' = the weights sampling uses, the first EMA copy
or the raw generator; 'raw', 'fake', 'disc') and the step, returns scalars to
log (possibly none), and writes its files only on process 0. It compiles what
it needs once, at construction or first call.

  grid   PNG of one-step samples from fixed noise (every `sample_every`), also
         to TensorBoard
  fid    FID against reference statistics (every `eval.fid_every`)
  toy    the toy report: metrics.json and toy.png after the last iteration
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax

from fdistill_jax.data import pixels
from fdistill_jax.eval import figures
from fdistill_jax.eval import fid as fid_lib
from fdistill_jax.eval import metrics
from fdistill_jax.eval import sampling
from fdistill_jax.toy import report as toy_report


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator may use: the run's config, workdir, networks and writer.

  Attributes:
    config: the run's (frozen) config.
    workdir: the run's directory.
    models: the run's networks (`train.models.Models`: teacher, student, heads, ...).
    teacher_vars: the frozen teacher's variables.
    devices: the devices to sample on.
    writer: a clu metric writer (images, scalars).
    initial_params: the parameters the generator started from.
    samples_dir: where sample grids go.
  """
  config: Any
  workdir: str
  models: Any
  teacher_vars: Any
  devices: tuple
  writer: Any
  initial_params: Any
  samples_dir: str

  @property
  def is_primary(self):
    return jax.process_index() == 0


class Evaluator:
  """Base: `every` (0: not periodic) and `at_end` decide when the loop calls it."""
  every: int = 0
  at_end: bool = True

  def __call__(self, params, step) -> dict:
    raise NotImplementedError


def generator_sampler(ctx: EvalContext, batch) -> sampling.BatchSampler:
  """A compiled one-step sampler of the run's generator (sigma_init from the config)."""
  m = ctx.models
  fn = sampling.generator_batch_fn(m.student, m.sample_shape, m.num_classes,
                                   ctx.config.loss.sigma_init)
  return sampling.BatchSampler(fn, batch, ctx.devices)


class SampleGrid(Evaluator):
  """samples/step_NNNNNNN.png (and TensorBoard 'samples') from the same noise each time."""

  def __init__(self, ctx: EvalContext):
    self.ctx, self.every = ctx, int(ctx.config.sample_every)
    self.num = int(ctx.config.num_sample_images)
    self.sampler = generator_sampler(ctx, self.num)
    self.seed = int(ctx.config.seed) + 2

  def __call__(self, params, step):
    x, labels = self.sampler(params["generator"], self.num, seed=self.seed)
    if not self.ctx.is_primary or x.ndim != 4:
      return {}
    images = pixels.to_uint8(x)
    figures.save_image_grid(
        images, os.path.join(self.ctx.samples_dir, f"step_{step:07d}.png"),
        labels=labels if self.ctx.models.num_classes else None,
        title=f"one-step samples, step {step} ({self.ctx.config.divergence}; labels: class)")
    self.ctx.writer.write_images(step, {"samples": figures.image_grid(images)[None]})
    return {}


class PeriodicFID(Evaluator):
  """FID of `eval.num_samples` one-step samples against `eval.ref` (EDM statistics).

  The sampler and the Inception network are compiled once; every evaluation
  uses the same noise.
  """

  def __init__(self, ctx: EvalContext):
    ec = ctx.config.eval
    self.ctx, self.every, self.num = ctx, int(ec.fid_every), int(ec.num_samples)
    self.ref = metrics.load_reference_stats(ec.ref)
    self.feature_fn = fid_lib.load_feature_fn(ec.inception)
    self.sampler = generator_sampler(ctx, min(ctx.config.batch_size, self.num))
    self.seed = int(ctx.config.seed) + 3

  def samples(self, params):
    """The images FID is computed on (uint8 NHWC)."""
    return self.sampler(params["generator"], self.num, seed=self.seed,
                        postprocess=pixels.to_uint8, what="FID samples")[0]

  def __call__(self, params, step):
    value = fid_lib.fid_from_samples(self.samples(params), self.ref["mu"], self.ref["sigma"],
                                     self.feature_fn)
    return {"eval/fid": value}


def _grid(ctx):
  return SampleGrid(ctx) if ctx.config.sample_every > 0 else None


def _fid(ctx):
  return PeriodicFID(ctx) if ctx.config.eval.fid_every > 0 else None


# name -> builder(ctx) -> Evaluator, or None when the config switches it off.
EVALUATORS: dict[str, Callable[[EvalContext], Optional[Evaluator]]] = {
    "grid": _grid,
    "fid": _fid,
    "toy": toy_report.ToyReport,
}


def build(names, ctx: EvalContext) -> list:
  """[(name, evaluator)] for the names listed, in order, skipping the ones switched off."""
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(f"eval.evaluators has unknown names {unknown}; known: "
                     f"{sorted(EVALUATORS)}.")
  built = [(n, EVALUATORS[n](ctx)) for n in names]
  return [(n, e) for n, e in built if e is not None]


def as_params(state) -> dict:
  """The `params` dict evaluators receive, from a TrainState.

  'generator' is `state.ema[0]`, the copy with the first of `config.ema_decays`
  (0.9999 per iteration in the paper configs: FastGen's `use_ema[0]`, the one
  its inference uses), or the raw generator when the run keeps no EMA.
  """
  generator = state.ema[0] if state.ema else state.gen
  return {"generator": generator, "raw": state.gen, "fake": state.fake, "disc": state.disc}

