"""Evaluators: periodic work on the generator, called by the loop as `evaluator(params, step)`.

The training loop builds the evaluators `config.eval.evaluators` names from
the run's registry once (the generic ones below, `EVALUATORS`, and the
problems' own, added by `fdistill_jax.plugins`), with an `EvalContext` (the
run's static pieces), and calls each at its own period and after the last
iteration. An evaluator receives
`params` (a dict from the training method: for f-distill 'generator' = the
weights sampling uses, the first EMA copy or the raw generator; 'raw', 'fake',
'disc'; for EDM teacher training 'denoiser' and 'raw') and the step, returns
scalars to log (possibly none), and writes its files only on process 0. It
compiles what it needs once, at construction or first call. How the trained
network makes samples comes from the method too (`EvalContext.samplers`, the
first being the one grids and FID use).

  grid   PNG of one-step samples from fixed noise (every `sample_every`), also
         to TensorBoard
  fid    FID against reference statistics (every `eval.fid_every`)

and, from the problems: 'toy' (`problems.toy.report`), 'digits'
(`problems.digits.report`), 't2i_grid' and 't2i' (`problems.t2i.grid`,
`problems.t2i.evaluator`).
"""

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import jax

from fdistill_jax.data import pixels
from fdistill_jax.metrics import figures
from fdistill_jax.metrics import fid as fid_lib
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.pipelines import sampling


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
    samplers: how the trained network makes samples (`sampling.ModelSampler`s,
      from the method); empty means the one-step generator (`model_samplers`).
  """
  config: Any
  workdir: str
  models: Any
  teacher_vars: Any
  devices: tuple
  writer: Any
  initial_params: Any
  samples_dir: str
  samplers: tuple = ()

  @property
  def is_primary(self):
    return jax.process_index() == 0

  def model_samplers(self) -> tuple:
    """The method's samplers, or the one-step generator with the config's sigma_init."""
    return tuple(self.samplers) or (one_step_sampler(self.models, self.config.loss.sigma_init),)


class Evaluator:
  """Base: `every` (0: not periodic) and `at_end` decide when the loop calls it."""
  every: int = 0
  at_end: bool = True

  def __call__(self, params, step) -> dict:
    raise NotImplementedError


def one_step_sampler(models, sigma_init) -> sampling.ModelSampler:
  """The f-distill generator: one call of `models.student` with the 'generator' params."""
  return sampling.one_step_model_sampler(models.student, models.sample_shape,
                                         models.num_classes, sigma_init, "generator")


def generator_sampler(ctx: EvalContext, batch) -> sampling.BatchSampler:
  """A compiled sampler of the run's first `ModelSampler` (the one-step generator when
  distilling); sample it with `params[params_key(ctx)]`."""
  return sampling.BatchSampler(ctx.model_samplers()[0].batch_fn, batch, ctx.devices)


def params_key(ctx: EvalContext) -> str:
  """The `params` entry the first sampler reads ('generator' when distilling)."""
  return ctx.model_samplers()[0].params_key


class SampleGrid(Evaluator):
  """samples/step_NNNNNNN.png (and TensorBoard 'samples') from the same noise each time."""

  def __init__(self, ctx: EvalContext):
    self.ctx, self.every = ctx, int(ctx.config.sample_every)
    self.num = int(ctx.config.num_sample_images)
    self.sampler = generator_sampler(ctx, self.num)
    self.key = params_key(ctx)
    self.seed = int(ctx.config.seed) + 2

  def __call__(self, params, step):
    x, labels = self.sampler(params[self.key], self.num, seed=self.seed)
    if not self.ctx.is_primary or x.ndim != 4:
      return {}
    images = pixels.to_uint8(x)
    figures.save_image_grid(
        images, os.path.join(self.ctx.samples_dir, f"step_{step:07d}.png"),
        labels=labels if self.ctx.models.num_classes else None,
        title=f"{self.ctx.model_samplers()[0].name} samples, step {step} "
              f"({_run_name(self.ctx.config)}; labels: class)")
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
    self.key = params_key(ctx)
    self.seed = int(ctx.config.seed) + 3
    fid_lib.few_samples_warning(self.num)     # a warning, once, when the run starts

  def samples(self, params):
    """The images FID is computed on (uint8 NHWC)."""
    return self.sampler(params[self.key], self.num, seed=self.seed,
                        postprocess=pixels.to_uint8, what="FID samples")[0]

  def __call__(self, params, step):
    value = fid_lib.fid_from_samples(self.samples(params), self.ref["mu"], self.ref["sigma"],
                                     self.feature_fn)
    return {"eval/fid": value}


def _run_name(config):
  method = config.get("method", "fdistill")
  return config.divergence if method == "fdistill" else f"{method} training"


def _grid(ctx):
  return SampleGrid(ctx) if ctx.config.sample_every > 0 else None


def _fid(ctx):
  return PeriodicFID(ctx) if ctx.config.eval.fid_every > 0 else None


# The generic evaluators: name -> builder(ctx) -> Evaluator, or None when the config
# switches it off.
EVALUATORS: dict[str, Callable[[EvalContext], Optional[Evaluator]]] = {
    "grid": _grid,
    "fid": _fid,
}


def build(names, ctx: EvalContext, evaluators: Mapping[str, Callable] = EVALUATORS) -> list:
  """[(name, evaluator)] for the names listed, in order, skipping the ones switched off;
  `evaluators` (name -> builder) is the run's registry's (default: the generic ones)."""
  unknown = [n for n in names if n not in evaluators]
  if unknown:
    raise ValueError(f"eval.evaluators has unknown names {unknown}; known: "
                     f"{sorted(evaluators)}.")
  built = [(n, evaluators[n](ctx)) for n in names]
  return [(n, e) for n, e in built if e is not None]


def as_params(state) -> dict:
  """The `params` dict evaluators receive, from a TrainState.

  'generator' is `state.ema[0]`, the copy with the first of `config.ema_decays`
  (0.9999 per iteration in the paper configs: FastGen's `use_ema[0]`, the one
  its inference uses), or the raw generator when the run keeps no EMA.
  """
  generator = state.ema[0] if state.ema else state.gen
  return {"generator": generator, "raw": state.gen, "fake": state.fake, "disc": state.disc}

