r"""Images from a text-to-image run: its one-step student and its frozen teacher.

  run = run_sampling.load_run(WORKDIR, registry=REGISTRY)    # teacher + EMA generator
  images, prompt_index = run_sampling.generate(run, prompts, seed=0, batch=16)
  teacher, _ = run_sampling.teacher_generate(run, prompts, steps=50, cfg=1.75)

* Student (paper Sec. 3, Algorithm 1; App. D): latents = G(sigma_init z,
  sigma_init, E_text(prompt)), one call of the generator U-Net with the run's
  generator parameters, decoded by the teacher's VAE (`LatentDenoiser.decode`).
* Teacher: N-step (default 50) classifier-free-guided sampling of the run's
  frozen teacher (`fdistill_jax.pipelines.sd_sampling`: Euler steps of the PF-ODE at
  DDIM's noise levels, which is deterministic DDIM; the unconditional input is
  the empty prompt's embedding). The levels come from the teacher's discrete
  schedule with SD 1.5's scheduler settings (steps_offset 1, final sigma_min),
  which SDXL's scheduler shares ('leading' spacing, steps_offset 1).

SD 1.5 and SDXL runs alike: the run's conditioning (`distill.TextConditioning`)
tokenises on the host, encodes the prompts (SDXL: both
towers, pooled text and size/crop numbers) and gives CFG's unconditional input.

Prompts are tokenised on the host; the text tower runs inside the jitted
batch. Image i (prompt i // num_per_prompt) starts from the noise
z_i = normal(fold_in(fold_in(PRNGKey(seed), i), 0)) of `fdistill_jax.pipelines.sampling`,
so it depends on (seed, i) only, not on the batch size or the device count,
and the student and the teacher start from the same z_i. Batches are sharded
over the devices with `eval.sampling.BatchSampler` (compiled once per sampler).
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

import numpy as np

from fdistill_jax import console
from fdistill_jax.data import pixels
from fdistill_jax.data import webdataset
from fdistill_jax.io import atomic
from fdistill_jax.metrics import figures
from fdistill_jax.pipelines import sampling as sampling_lib
from fdistill_jax.pipelines import sd
from fdistill_jax.pipelines import sd_sampling
from fdistill_jax.problems.t2i import distill
from fdistill_jax.train import checkpoint as ckpt_lib

DEFAULT_BATCH = 16   # 512x512 images per jitted call: the VAE decoder's activations dominate


T2I_KINDS = ("sd15", "sdxl")   # generator specs (generator_spec.json 'kind') of text-to-image runs


class RunError(ValueError):
  """A run cannot be sampled as a text-to-image run."""


@dataclasses.dataclass(frozen=True)
class T2IRun:
  """What sampling a text-to-image run needs.

  Attributes:
    teacher: the frozen teacher `LatentDenoiser` (U-Net, text tower, VAE).
    student: the generator architecture (`LatentDenoiser`, U-Net only).
    teacher_vars: the teacher's variables {'params': {'unet', 'text_encoder', 'vae'}}.
    conditioning: the run's `distill.TextConditioning` (SD 1.5 or SDXL):
      prompts -> token ids on the host (`host`), ids -> the U-Net's conditioning
      (`draw`), and CFG's unconditional input (`uncond`).
    latent_shape: (h, w, C) of the U-Net's latents.
    sigma_init: the generator's input noise level (`loss.sigma_init`).
    generator_params: the generator's parameters {'unet': ...}, or None.
    info: where the parameters came from (step, which, source).
  """
  teacher: sd.LatentDenoiser
  student: sd.LatentDenoiser
  teacher_vars: Any
  conditioning: distill.TextConditioning = dataclasses.field(repr=False)
  latent_shape: tuple
  sigma_init: float
  generator_params: Any = dataclasses.field(default=None, repr=False)
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def tokenizer(self) -> Callable:
    """The (first) tokenizer: prompts -> token ids [N, L]."""
    return self.conditioning.tokenizer

  def tokenize(self, prompts) -> dict:
    """Prompts -> {'tokens': int32 ids [N, L]} (SDXL: and 'tokens_2'), on the host."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise RunError("need a non-empty list of prompt strings.")
    return self.conditioning.host({"captions": prompts})


def from_models(models, teacher_vars, sigma_init, generator_params=None, info=None) -> T2IRun:
  """A T2IRun from a run's `train.models.Models` (text conditioning) and teacher variables."""
  cond = models.conditioning
  if not isinstance(cond, distill.TextConditioning):
    raise RunError("this run's teacher is not text-conditional (its conditioning is "
                   f"{type(cond).__name__}); text-to-image sampling needs an SD teacher "
                   "(teacher.kind='sd15', 'sdxl' or their '_random' kinds).")
  return T2IRun(teacher=cond.teacher, student=models.student, teacher_vars=teacher_vars,
                conditioning=cond,
                latent_shape=tuple(models.sample_shape), sigma_init=float(sigma_init),
                generator_params=generator_params, info=dict(info or {}))


def is_t2i_run(workdir) -> bool:
  """True when `workdir`'s generator_spec.json names an SD generator (`T2I_KINDS`)."""
  return ckpt_lib.generator_kind(workdir) in T2I_KINDS


def load_run(workdir, *, registry, which="ema", step=None) -> T2IRun:
  """The teacher (rebuilt from the run's config.json) and the generator of a training workdir.

  The teacher is built from the run's `teacher` config (an SD folder is read
  again; `sd15_random` / `sdxl_random` is redrawn from its seed) and checked against the
  run's teacher.json. An exported generator holds the U-Net alone, without
  the text tower and VAE it needs, and is refused. `registry` (a
  `train.registry.Registry`, e.g. `fdistill_jax.plugins.default_registry()`)
  builds the teacher and the generator.
  """
  from fdistill_jax.train import models as models_lib  # pylint: disable=g-import-not-at-top
  if ckpt_lib.is_export(workdir):
    raise RunError(f"{workdir} is an exported generator: it holds the U-Net alone, not the "
                   "text tower and VAE a text-to-image sample needs; sample the training "
                   "workdir it was exported from.")
  try:
    config = ckpt_lib.run_config(workdir)
  except FileNotFoundError as e:
    raise RunError(str(e)) from None
  teacher = registry.teacher(config)
  _check_teacher(workdir, teacher.identity)
  module, params, info = ckpt_lib.load_generator(
      workdir, which=which, step=step, student_from_spec=registry.student_from_spec)
  models = models_lib.from_teacher(teacher, config.disc)
  run = from_models(models, teacher.variables, info["sigma_init"], params, info)
  return dataclasses.replace(run, student=module)


def _check_teacher(workdir, identity):
  try:
    ckpt_lib.check_teacher(workdir, identity)
  except ckpt_lib.CheckpointError as e:
    raise RunError(f"The teacher the run's config names is not the one it was trained with "
                   f"({e}); restore the teacher it was made with.") from None


# ----------------------------------------------------------------------------
# Batch functions: fn(variables, key, indices) -> (images in [-1, 1], prompt index).


def _context(run, teacher_vars, tokens, indices, num_per_prompt):
  """The conditioning of images `indices` (prompt i // num_per_prompt), and those prompts."""
  prompt = indices // num_per_prompt
  ids = jax.tree.map(lambda t: jnp.take(t, prompt, axis=0, mode="clip"), tokens)
  return run.conditioning.draw(teacher_vars, None, indices, ids), prompt


def _num_prompts(tokens) -> int:
  return len(jax.tree.leaves(tokens)[0])


def student_batch_fn(run: T2IRun, num_per_prompt=1):
  """One-step images; variables {'generator', 'teacher', 'tokens' (`T2IRun.tokenize`)}."""
  def fn(v, key, indices):
    tv = {"params": v["teacher"]}
    context, prompt = _context(run, tv, v["tokens"], indices, num_per_prompt)
    z = sampling_lib.sample_noise(key, indices, run.latent_shape)
    latents = sampling_lib.generate(run.student, v["generator"], z, context, run.sigma_init)
    return run.teacher.apply(tv, latents, method="decode"), prompt
  return fn


def teacher_batch_fn(run: T2IRun, sigmas, cfg, num_per_prompt=1):
  """Guided teacher images over `sigmas` (`sd_sampling.guided_batch_fn`); variables
  {'teacher', 'tokens'}. The unconditional input is the conditioning's (`uncond`: SD 1.5
  the empty prompt's embedding; SDXL base zeros)."""
  def encode(tv, tokens):
    cond = run.conditioning.draw(tv, None, None, tokens)
    return cond, run.conditioning.uncond(tv, jax.tree.map(lambda c: c[:1], cond))
  return sd_sampling.guided_batch_fn(run.teacher, encode, sigmas, cfg, run.latent_shape,
                                     num_per_prompt)


class StudentSampler:
  """The one-step student's images for prompts, compiled once (periodic evaluation)."""

  def __init__(self, run: T2IRun, batch=DEFAULT_BATCH, num_per_prompt=1, devices=None):
    self.run, self.num_per_prompt = run, _positive(num_per_prompt, "num_per_prompt")
    self.sampler = sampling_lib.BatchSampler(student_batch_fn(run, num_per_prompt), batch,
                                             devices)

  def __call__(self, params, tokens, *, seed=0):
    """(uint8 images [P * num_per_prompt, H, W, 3], int32 prompt index) for the tokens of P
    prompts (`T2IRun.tokenize`)."""
    variables = {"generator": params, "teacher": self.run.teacher_vars["params"],
                 "tokens": jax.tree.map(lambda t: jnp.asarray(t, jnp.int32), tokens)}
    return self.sampler(variables, _num_prompts(tokens) * self.num_per_prompt, seed=seed,
                        postprocess=pixels.to_uint8, what="one-step text-to-image samples")


def generate(run: T2IRun, prompts, *, params=None, seed=0, batch=DEFAULT_BATCH,
             num_per_prompt=1, devices=None):
  """One-step student images of `prompts` (module docstring).

  Args:
    run: `load_run(workdir)` or `from_models(...)`.
    prompts: a prompt or a list of prompts.
    params: generator parameters {'unet': ...} (default: `run.generator_params`).
    seed: image i uses the noise of (seed, i).
    batch: images per jitted call (rounded up to a multiple of the device count).
    num_per_prompt: images per prompt (image i shows prompt i // num_per_prompt).
    devices: devices to shard over (default: all).

  Returns:
    (uint8 images [N, H, W, 3], int32 prompt_index [N]), N = len(prompts) * num_per_prompt.
  """
  params = run.generator_params if params is None else params
  if params is None:
    raise RunError("no generator parameters: pass params= or use load_run(workdir).")
  tokens = run.tokenize(prompts)
  batch = max(1, min(_positive(batch, "batch"), _num_prompts(tokens) * num_per_prompt))
  return StudentSampler(run, batch, num_per_prompt, devices)(params, tokens, seed=seed)


def teacher_generate(run: T2IRun, prompts, *, steps=50, cfg=7.5, sampler="ddim", seed=0,
                     batch=DEFAULT_BATCH, num_per_prompt=1, devices=None):
  """The frozen teacher's images of `prompts`: `steps` guided DDIM (or Euler) steps.

  `cfg` is the guidance weight w of D_u + w (D_c - D_u) (1: no guidance; SD's
  usual 7.5; the run's `loss.cfg_weight` is the teacher the student is
  distilled towards). Other arguments and the return value as `generate`.
  """
  tokens = run.tokenize(prompts)
  sigmas = sd_sampling.sampler_sigmas(run.teacher.schedule(), sampler, _positive(steps, "steps"))
  fn = teacher_batch_fn(run, sigmas, float(cfg), _positive(num_per_prompt, "num_per_prompt"))
  variables = {"teacher": run.teacher_vars["params"],
               "tokens": jax.tree.map(jnp.asarray, tokens)}
  return sampling_lib.sample_all(fn, variables, _num_prompts(tokens) * num_per_prompt, seed=seed,
                                 batch=_positive(batch, "batch"), devices=devices,
                                 postprocess=pixels.to_uint8,
                                 what=f"teacher samples ({steps} steps, CFG {cfg:g})")


def _positive(value, name):
  if int(value) < 1:
    raise RunError(f"{name}={value}; it must be a positive integer.")
  return int(value)


# ----------------------------------------------------------------------------
# Prompts in, files out: what `tools.sample` (a run) and `tools.sample_t2i` (a model) share.


def prompts_from_flags(prompts, prompts_file):
  """--prompt values, then those of --prompts_file (.txt or .jsonl); at least one required."""
  out = list(prompts)
  if prompts_file:
    out += webdataset.read_prompts(prompts_file, what="--prompts_file")[0]
  if not out:
    raise ValueError("give --prompt and/or --prompts_file (one prompt per line).")
  return out


def write_outputs(images, prompt_index, prompts, seed, out=None, npz=None):
  """The npz and/or the captioned PNG grid (with OUT.txt listing each tile's prompt)."""
  if npz:
    atomic.write_npz(npz, images=images, prompt_index=prompt_index.astype(np.int32),
                     prompts=np.asarray(prompts), seed=np.int64(seed))
  if out:
    captions = [_short(prompts[p]) for p in prompt_index]
    per_prompt = int(np.bincount(prompt_index).max())      # one row per prompt
    figures.save_image_grid(images, out, labels=captions, tile_inches=1.6,
                            ncols=per_prompt if per_prompt > 1 else None,
                            title=f"text-to-image samples, seed {seed}")
    lines = [f"{i}\t{p}\t{prompts[p]}" for i, p in enumerate(prompt_index)]
    atomic.write_text(out + ".txt", "index\tprompt_index\tprompt (grid row-major)\n" +
                      "\n".join(lines) + "\n")


def _short(text, width=28):
  return text if len(text) <= width else text[:width - 3] + "..."


def sample_command(f, registry):
  """`tools.sample --workdir=RUN` of a text-to-image run (the registry's `samplers` entry;
  `registry` builds the run's networks):
  --num_per_prompt one-step images of each --prompt / --prompts_file prompt into --out
  (npz) and --grid (captioned PNG); returns the npz's path."""
  if not (f.prompt or f.prompts_file):
    raise ValueError(f"{f.workdir} is a text-to-image run: give --prompt and/or "
                     "--prompts_file (one prompt per line).")
  if f["num"].present or f.labels != "uniform":
    raise ValueError("--num and --labels do not apply to a text-to-image run: it makes "
                     "--num_per_prompt images per prompt.")
  if f.num_per_prompt < 1:
    raise ValueError(f"--num_per_prompt={f.num_per_prompt} must be positive.")
  prompts = prompts_from_flags(f.prompt, f.prompts_file)
  run = load_run(f.workdir, which=f.which, step=f.step, registry=registry)
  console.say("Sampling %s weights of step %s (%s).", run.info["which"], run.info["step"],
              run.info["source"])
  images, prompt_index = generate(run, prompts, seed=f.seed,
                                  batch=DEFAULT_BATCH if f.batch is None else f.batch,
                                  num_per_prompt=f.num_per_prompt)
  write_outputs(images, prompt_index, prompts, f.seed, out=f.grid, npz=f.out)
  return os.path.abspath(f.out)
