"""Durable runs: orbax checkpoints, automatic resume, config compatibility, export.

A checkpoint holds the TrainState and the config it was made with (JSON).
The frozen teacher is never in it. Saves are asynchronous; orbax writes each
step into a temporary directory and renames it when complete, so a run killed
mid-save leaves only complete checkpoints visible. A latest checkpoint that
cannot be read is skipped with a warning and the previous one is used.
"""

import json
import logging
import os

import jax
import orbax.checkpoint as ocp

# Config fields that must match to resume: they change what the state means.
COMPATIBLE_KEYS = ("divergence", "teacher.kind", "teacher.arch", "toy.width", "toy.depth",
                   "disc.resolutions", "disc.channels", "disc.features_from", "ema_decays",
                   "compute_dtype")


def manager(workdir, config):
  """An orbax CheckpointManager under workdir/checkpoints (async, keep last K)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "config"))


def save(mngr, step, state, config):
  """Starts an asynchronous save of `state` and the config at `step`."""
  mngr.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)


def _lookup(cfg, dotted):
  for part in dotted.split("."):
    if not isinstance(cfg, dict) or part not in cfg:
      return None
    cfg = cfg[part]
  return cfg


def check_compatible(saved, config):
  """Refuses to resume a checkpoint made with an incompatible config."""
  current = json.loads(config.to_json())
  diffs = [(k, _lookup(saved, k), _lookup(current, k)) for k in COMPATIBLE_KEYS
           if json.dumps(_lookup(saved, k), sort_keys=True)
           != json.dumps(_lookup(current, k), sort_keys=True)]
  if diffs:
    lines = "\n".join(f"  {k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs)
    raise ValueError("The checkpoint in the workdir was made with an incompatible config:\n"
                     f"{lines}\nUse a new --workdir, or run with the checkpoint's settings.")


def restore_latest(mngr, abstract_state, config):
  """Restores the newest readable checkpoint; returns the state or None.

  Checkpoints that fail to load (truncated or corrupt files) are skipped with a
  warning, newest first. A checkpoint made with an incompatible config raises.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved_config = mngr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Skipping unreadable checkpoint at step %d: %s", step, e)
      continue
    check_compatible(saved_config, config)
    _check_shapes(mngr, step, abstract_state)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      logging.info("Resumed from checkpoint at step %d.", step)
      return restored["state"]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Skipping unreadable checkpoint at step %d: %s", step, e)
  return None


def _saved_shapes(mngr, step):
  """{path: shape} of the saved state, from its metadata; None if unreadable."""
  path = os.path.join(str(mngr.directory), str(step), "state")
  try:
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  except Exception:  # pylint: disable=broad-except
    return None
  return _shapes(tree)


def _shapes(tree):
  """{'gen/model/enc/...': shape}, the same for dataclass, dict and list nodes."""
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {"/".join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(mngr, step, abstract_state):
  """Refuses a checkpoint whose arrays do not fit the current networks.

  Without this a mismatch (e.g. a teacher of another size at the same path)
  would look like an unreadable checkpoint, the run would start afresh, and
  keep-last-K would delete the good checkpoints.
  """
  saved = _saved_shapes(mngr, step)
  if saved is None:
    return                        # unreadable: restore_latest skips it
  want = _shapes(abstract_state)
  diffs = [f"  {k}: checkpoint {saved.get(k)}, run {want.get(k)}"
           for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  if diffs:
    raise ValueError(f"The checkpoint at step {step} does not fit this run's networks "
                     f"({len(diffs)} arrays differ), first:\n" + "\n".join(diffs[:8]) +
                     "\nUse a new --workdir, or the teacher and sizes the run was made with.")


def abstract(state):
  """ShapeDtypeStructs (with shardings) describing `state`, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
