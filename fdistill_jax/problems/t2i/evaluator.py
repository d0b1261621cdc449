r"""The 't2i' evaluator: COCO-style FID and CLIP score of the one-step student in training.

Every `eval.fid_every` iterations (and after the last) the student makes one
image for each of the first `eval.num_samples` prompts of `eval.prompts` (a
.txt or .jsonl prompts file, e.g. `evaluate_t2i --write_prompts` of COCO-2014
captions), from the same noise each time, and `sd.t2i_metrics.T2IMetrics`
scores them with the protocol of `python -m fdistill_jax.tools.evaluate_t2i`
(docs/text_to_image.md, "The evaluation protocol"; DMD2's resize to 256 before Inception and CLIP):

  eval/fid          against `eval.ref` (statistics of `evaluate_t2i --make_ref`,
                    made with the same protocol) with `eval.inception`
  eval/clip_score   mean raw cosine with the CLIP folder `eval.clip` (the
                    paper's 0.292 scale); also eval/clip_score_x100

Either metric may be left unset (`eval.ref` = "" or `eval.clip` = ""), not
both. FID here uses the fast `eigh` Frechet distance and as many samples as
`eval.num_samples` (the paper's COCO numbers: 30k, with `evaluate_t2i`);
periodic values track training, they are not the table's numbers.
"""

import numpy as np

from fdistill_jax.data import webdataset
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.metrics.t2i import metrics as t2i_metrics


def eval_prompts(ec):
  """The first `eval.num_samples` prompts of `eval.prompts`; too few is an error."""
  if not ec.get("prompts", ""):
    raise ValueError("eval.fid_every > 0 with the 't2i' evaluator needs eval.prompts: a .txt "
                     "or .jsonl file of evaluation prompts (write COCO's with python -m "
                     "fdistill_jax.tools.evaluate_t2i --write_prompts=FILE ...), or set "
                     "eval.fid_every=0.")
  prompts = webdataset.read_prompts(ec.prompts, what="eval.prompts")[0]
  num = int(ec.num_samples)
  if num < 1 or len(prompts) < num:
    raise ValueError(f"eval.num_samples={num} but eval.prompts={ec.prompts!r} holds "
                     f"{len(prompts)} prompts; lower eval.num_samples or give more prompts.")
  return prompts[:num]


class T2IEvaluation:
  """The 't2i' evaluator (module docstring); `every` = `eval.fid_every`."""
  at_end = True

  def __init__(self, ctx):
    ec = ctx.config.eval
    if not (ec.get("ref", "") or ec.get("clip", "")):
      raise ValueError("The 't2i' evaluator has nothing to compute: set eval.ref and "
                       "eval.inception (FID) and/or eval.clip (CLIP score), or set "
                       "eval.fid_every=0.")
    if ec.get("ref", "") and not ec.get("inception", ""):
      raise ValueError("eval.ref is set but eval.inception is not: FID needs the Inception "
                       "weights the reference statistics were made with.")
    self.every = int(ec.fid_every)
    self.prompts = eval_prompts(ec)
    self.metrics = t2i_metrics.T2IMetrics(ec.get("ref", "") or None,
                                          ec.get("inception", "") or None,
                                          ec.get("clip", "") or None)
    run = run_sampling.from_models(ctx.models, ctx.teacher_vars, ctx.config.loss.sigma_init)
    self.tokens = run.tokenize(self.prompts)
    batch = min(int(ec.get("batch", run_sampling.DEFAULT_BATCH)), len(self.prompts))
    self.sampler = run_sampling.StudentSampler(run, batch, devices=ctx.devices)
    self.seed = int(ctx.config.seed) + 3

  def samples(self, params):
    """The student's uint8 images, one per prompt, from the same noise at every call."""
    return self.sampler(params["generator"], self.tokens, seed=self.seed)[0]

  def __call__(self, params, step):
    del step
    scores = self.metrics(np.asarray(self.samples(params)), self.prompts)
    return {f"eval/{k}": float(v) for k, v in scores.items() if k != "num_samples"}


def build(ctx):
  """The registry's builder: None when `eval.fid_every` is 0 (switched off)."""
  return T2IEvaluation(ctx) if ctx.config.eval.fid_every > 0 else None
