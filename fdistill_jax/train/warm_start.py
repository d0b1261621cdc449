"""Warm start (`config.init_from=RUN_DIR`): networks from another run, everything else fresh.

The paper (Sec. 5) warms up the discriminator of its text-to-image runs "by
initialising the model with a pre-trained reverse-KL model". With
`--config.init_from=RUN_DIR` a new run takes the generator, the fake score and
the discriminator heads from the newest readable checkpoint of RUN_DIR (e.g.
an `rkl` run), and starts everything else afresh: the step counter at 0, new
optimiser states, the learning-rate schedules from their start, the
generator's EMA copies equal to the loaded generator, and the running per-bin
ratio mean of stage 1 at its initial value. It applies only when the workdir
has no checkpoint of its own: a run that resumes continues from its own state.
"""

import os

import jax
import numpy as np

from fdistill_jax import console
from fdistill_jax.train import checkpoint as ckpt_lib

PARTS = ("gen", "fake", "disc")
# Divergences whose weight h(r) reads the discriminator's density ratio from the start.
ADVISED = ("js", "fkl")


def advise(config):
  """One line for a js / fkl run that starts cold where the paper warm-starts
  (`warm_start_advised`, set by the text-to-image configs)."""
  if config.get("warm_start_advised", False) and config.divergence in ADVISED:
    console.say("Note: %s starts from the teacher. The paper (Sec. 5) starts its text-to-image "
                "%s runs from a pre-trained reverse-KL run, so that the discriminator's density "
                "ratio r is meaningful from the first step; to do so, train an rkl run first and "
                "pass --config.init_from=RUN_DIR (docs/t2i_settings.md).",
                config.divergence, config.divergence)


def restore_parts(run_dir, parts=PARTS):
  """({part: numpy params}, step) from the newest readable checkpoint of `run_dir`."""
  if not os.path.isdir(run_dir):
    raise ckpt_lib.CheckpointError(f"init_from={run_dir!r} is not a directory; point it at "
                                   "the workdir of a finished or running distillation run.")
  mngr = ckpt_lib._reader(run_dir)  # pylint: disable=protected-access
  def read(step):
    state_dir = os.path.join(str(mngr.directory), str(step), "state")
    out = {p: ckpt_lib._restore_subtree(state_dir, p)[p] for p in parts}  # pylint: disable=protected-access
    return out
  try:
    found = ckpt_lib.newest_readable(list(mngr.all_steps()), read)
  finally:
    mngr.close()
  if found is None:
    raise ckpt_lib.CheckpointError(f"init_from={run_dir!r} has no readable checkpoint; let "
                                   "that run write one (checkpoint_every) first.")
  return found[1], found[0]


def _check_fits(loaded, current, part, run_dir):
  want, got = ckpt_lib._shapes(current), ckpt_lib._shapes(loaded)  # pylint: disable=protected-access
  diffs = [f"{k}: init_from {got.get(k)}, run {want.get(k)}"
           for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
  if diffs:
    raise ckpt_lib.CheckpointError(
        f"init_from={run_dir!r}: its '{part}' does not fit this run's networks ({len(diffs)} "
        f"arrays differ, first: {'; '.join(diffs[:3])}); warm-start from a run of the same "
        "teacher and disc.resolutions.")


def _like(arrays, template):
  """numpy `arrays` as global jax.Arrays with `template`'s shardings and dtypes."""
  def put(a, t):
    a = np.asarray(a, t.dtype)
    return jax.make_array_from_callback(a.shape, t.sharding, lambda idx: a[idx])
  return jax.tree.map(put, arrays, template)


def warm_start(state, run_dir):
  """`state` with generator, fake score and heads from `run_dir` (module docstring)."""
  loaded, step = restore_parts(run_dir)
  parts = {}
  for part in PARTS:
    current = getattr(state, part)
    _check_fits(loaded[part], current, part, run_dir)
    parts[part] = _like(jax.tree.unflatten(jax.tree.structure(current),
                                           jax.tree.leaves(loaded[part])), current)
  ema = tuple(_like(jax.tree.unflatten(jax.tree.structure(e), jax.tree.leaves(loaded["gen"])), e)
              for e in state.ema)
  console.say("Warm start: generator, fake score and discriminator from %s (step %d); step, "
              "optimiser states and schedules start afresh.", run_dir, step)
  return state.replace(ema=ema, **parts)
