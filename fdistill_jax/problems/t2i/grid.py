r"""The 't2i_grid' evaluator: fixed prompts, the teacher beside the one-step student.

Every `sample_every` iterations (and after the last) it writes

  samples/t2i_step_NNNNNNN.png   one row per prompt (captioned): the teacher's
                                 image (left) beside the student's (right)
  TensorBoard 't2i_samples'      the same tiles, teacher | student per row

Both columns start from the same noise z_i of image i (`sd.run_sampling`).
The teacher is frozen, so its images are made once, when the evaluator is
built: `eval.grid_steps` guided steps (`eval.grid_sampler`, DDIM by default)
with CFG weight `eval.grid_cfg`, where 0 (the default) means the run's
`loss.cfg_weight`, the guided teacher the student is distilled towards (paper
App. D), so that the two columns show the same target (SD's usual 7.5 gives
more saturated teacher images than the student is trained to match). The
student (one call) is sampled at each evaluation with the weights evaluators
receive ('generator': the first EMA copy, or the raw generator of a run that keeps
none, as the text-to-image configs).

Prompts: `eval.grid_prompts_file` (one prompt per line) when set, else
`eval.grid_prompts`. The configs set the paper's (`paper_prompts`): Fig. 7's
eight for SD 1.5, Fig. 1's eight for SDXL, from `paper_prompts.jsonl` beside
this module, the 40 prompts printed in Xu, Nie, Vahdat, "One-step Diffusion
Models with f-Divergence Distribution Matching" (2025): Fig. 1 (SDXL,
sampled from COYO-700M), Fig. 7 and Fig. 19 (SD 1.5, MS-COCO captions), one
JSON object {"figure": "fig1" | "fig7" | "fig19", "prompt": ...} a line, in
the paper's order and spelling. `DEFAULT_PROMPTS`, the fallback of a config
without `eval.grid_prompts`, is the first four captions of the COCO-2014
caption list DMD2 samples its SD 1.5 grids from (tianweiy/DMD2,
`main/coco_eval/captions_coco14_test.txt`).
"""

import functools
import importlib.resources
import json
import os

import numpy as np

from fdistill_jax.data import webdataset
from fdistill_jax.metrics import figures
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.pipelines import sd_sampling

DEFAULT_PROMPTS = (
    "A motorcycle parked in a parking space next to another motorcycle.",
    "A picture of a dog laying on the ground.",
    "Birds perch on a bunch of twigs in the winter.",
    "A toy dinosaur standing on a sink next to a running faucet.",
)
TB_TAG = "t2i_samples"
PAPER_PROMPTS = "paper_prompts.jsonl"
PAPER_FIGURES = ("fig1", "fig7", "fig19")


@functools.lru_cache(maxsize=None)
def paper_prompts(figure):
  """The prompts of one of the paper's figures ('fig1', 'fig7', 'fig19'), as a tuple."""
  if figure not in PAPER_FIGURES:
    raise ValueError(f"figure={figure!r}; the paper prints prompts for {PAPER_FIGURES}.")
  text = importlib.resources.files(__package__).joinpath(PAPER_PROMPTS).read_text("utf-8")
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return tuple(r["prompt"] for r in rows if r["figure"] == figure)


def grid_prompts(eval_config):
  """The grid's prompts: the file's lines, else `eval.grid_prompts` (module docstring)."""
  path = eval_config.get("grid_prompts_file", "")
  if path:
    return webdataset.read_prompts(path, what="eval.grid_prompts_file")[0]
  prompts = list(eval_config.get("grid_prompts", DEFAULT_PROMPTS))
  if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ValueError(f"eval.grid_prompts={prompts!r}: give at least one non-empty prompt.")
  return prompts


def grid_cfg(config):
  """`eval.grid_cfg`, or the run's `loss.cfg_weight` when it is 0."""
  cfg = float(config.eval.get("grid_cfg", 0.0))
  return cfg if cfg > 0 else float(config.loss.cfg_weight)


class T2IGrid:
  """The 't2i_grid' evaluator (module docstring); `every` = `sample_every`."""
  at_end = True

  def __init__(self, ctx):
    config, ec = ctx.config, ctx.config.eval
    self.ctx, self.every = ctx, int(config.sample_every)
    self.prompts = grid_prompts(ec)
    self.seed = int(config.seed) + 2
    self.run = run_sampling.from_models(ctx.models, ctx.teacher_vars, config.loss.sigma_init)
    self.tokens = self.run.tokenize(self.prompts)
    steps = int(ec.get("grid_steps", 50))
    sampler = ec.get("grid_sampler", "ddim")
    if sampler not in sd_sampling.SAMPLERS:
      raise ValueError(f"eval.grid_sampler={sampler!r}; expected one of {sd_sampling.SAMPLERS}.")
    cfg = grid_cfg(config)
    self.teacher_name = f"teacher: {sampler.upper()}, {steps} steps, CFG {cfg:g}"
    batch = len(self.prompts)
    self.teacher_images = run_sampling.teacher_generate(
        self.run, self.prompts, steps=steps, cfg=cfg, sampler=sampler, seed=self.seed,
        batch=batch, devices=ctx.devices)[0]
    self.sampler = run_sampling.StudentSampler(self.run, batch, devices=ctx.devices)

  def __call__(self, params, step):
    images, _ = self.sampler(params["generator"], self.tokens, seed=self.seed)
    if not self.ctx.is_primary:
      return {}
    columns = {self.teacher_name: self.teacher_images, "student: one step": images}
    figures.save_captioned_columns(
        os.path.join(self.ctx.samples_dir, f"t2i_step_{step:07d}.png"), columns, self.prompts,
        title=f"{self.ctx.config.divergence} run, step {step} (same noise per row)")
    tiles = np.stack([x for pair in zip(self.teacher_images, images) for x in pair])
    self.ctx.writer.write_images(step, {TB_TAG: figures.image_grid(tiles, ncols=2)[None]})
    return {}


def build(ctx):
  """The registry's builder: None when `sample_every` is 0 (switched off)."""
  return T2IGrid(ctx) if ctx.config.sample_every > 0 else None

