"""The workdir: its layout, orbax checkpoints, resume, and the generator's export.

This module is the only one that names files in a run's workdir:

  WORKDIR/
    checkpoints/<step>/{state,config}   orbax, asynchronous, last K kept
    generator_spec.json                 the generator's architecture (no teacher needed)
    config.json                         the resolved config of the run
    status.json                         {"state": "running"|"finished"|"preempted"|"failed", ...}
    teacher.json                        the teacher's identity (content hash / fit settings)
    run.lock                            held (flock) by the process running in the workdir
    checkpoints_unreadable/<step>-<t>   checkpoints that failed to load, moved aside
    log.txt                             the full log (the console shows progress only)
    samples/step_NNNNNNN.png            one-step sample grids
    events.out.tfevents.*               TensorBoard scalars and images (clu writer)

A checkpoint holds the TrainState and the config it was made with; the frozen
teacher is never in it. Orbax writes each step into a temporary directory and
renames it when complete, so a run killed mid-save leaves only complete
checkpoints visible; a latest checkpoint that cannot be read is skipped with a
warning and the previous one is used (`newest_readable`); the training run
moves it aside into checkpoints_unreadable/ (never deletes it), so that the
step can be saved again. A state with any non-finite array is never saved
(`nonfinite_leaves`), so every kept checkpoint is a good one.

An exported generator (`export_generator`) is a directory with
generator_spec.json, export.json and params/ (orbax), loadable without the
training workdir: `load_generator(path) -> (module, params, info)`.
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from fdistill_jax.io import limits
from fdistill_jax.io import atomic

CHECKPOINTS = "checkpoints"
GENERATOR_SPEC = "generator_spec.json"
CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
TEACHER_FILE = "teacher.json"
LOCK_FILE = "run.lock"
UNREADABLE = "checkpoints_unreadable"
LOG_FILE = "log.txt"
SAMPLES = "samples"
PARAMS_DIR = "params"                 # exported generator
EXPORT_FILE = "export.json"           # exported generator
DEFAULT_SIGMA_INIT = 80.0

# Config fields that must match to resume: they change what the state means. (A change of
# network sizes that no field here shows is caught by comparing the saved arrays' shapes.)
COMPATIBLE_KEYS = ("divergence", "teacher.kind", "teacher.arch", "disc.resolutions",
                   "disc.channels", "disc.features_from", "ema_decays", "compute_dtype",
                   "disc.head", "loss.num_bins", "optim.clip_critic")

_LOG = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A workdir, checkpoint or export directory is missing or unusable."""


def path(workdir, name):
  """Absolute path of `name` (one of this module's constants) in `workdir`."""
  return os.path.join(os.path.abspath(workdir), name)


def write_status(workdir, state, step, **extra):
  """Records the run's state in status.json (atomic write)."""
  atomic.write_json(path(workdir, STATUS_FILE), {"state": state, "step": int(step), **extra})


# ----------------------------------------------------------------------------
# Training checkpoints.


def remove_temporary_checkpoints(workdir):
  """Deletes orbax's unfinished save folders (`*.orbax-checkpoint-tmp*`) under checkpoints/.

  Called once the manager is closed (no save in flight): a save that failed,
  e.g. on a full disk, must not leave a partial copy of the state filling it.
  """
  directory = path(workdir, CHECKPOINTS)
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      full = os.path.join(directory, name)
      _LOG.warning("removing the unfinished checkpoint folder %s", full)
      shutil.rmtree(full, ignore_errors=True)


def manager(workdir, config):
  """An orbax CheckpointManager under workdir/checkpoints.

  Orbax decides when `save` writes: every `config.checkpoint_every`
  iterations (0: never by interval), at the last iteration, and at a
  multi-host preemption sync point (`reached_preemption`, the step every
  process agrees on after any of them got SIGTERM). Saves are asynchronous;
  the last `config.keep_checkpoints` are kept.
  """
  policies = [ocp.checkpoint_managers.SpecificStepsPolicy({int(config.total_steps)}),
              ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if config.checkpoint_every > 0:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(int(config.checkpoint_every)))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True,
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies))
  return ocp.CheckpointManager(path(workdir, CHECKPOINTS), options=options,
                               item_names=("state", "config"))


def save(mngr, step, state, config, force=False):
  """Saves `state` and the config at `step` if due (or `force`); True if it started."""
  return mngr.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=force)


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
    lines = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs)
    raise CheckpointError("The checkpoint in the workdir was made with an incompatible config "
                          f"({lines}). Use a new --workdir, or run with the checkpoint's "
                          "settings.")


def newest_readable(steps, read: Callable[[int], Any],
                    on_unreadable: Optional[Callable[[int, Exception], None]] = None):
  """(step, read(step)) for the newest step whose read succeeds; None if none.

  Steps are tried newest first; one whose read raises anything but
  `CheckpointError` (a truncated or corrupt file) is skipped with a warning
  and passed to `on_unreadable(step, error)`; `CheckpointError` (an
  incompatible checkpoint, a bad request) propagates.
  """
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (corrupt / truncated files)
      _LOG.warning("Skipping unreadable checkpoint at step %d: %s", step, e)
      if on_unreadable is not None:
        on_unreadable(step, e)
  return None


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def move_aside(mngr, step, error=None):
  """Moves checkpoints/<step> to checkpoints_unreadable/<step>-<time> (never deletes it).

  Leaving it in place would make the run skip it on every start and then fail
  to save that step again (orbax refuses an existing step): a crash loop.
  """
  src = os.path.join(str(mngr.directory), str(step))
  workdir = os.path.dirname(str(mngr.directory).rstrip("/"))
  _sync(f"fdistill_move_aside_{step}_a")
  if jax.process_index() == 0 and os.path.isdir(src):
    dst = os.path.join(workdir, UNREADABLE, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    _LOG.warning("Moved the unreadable checkpoint of step %d to %s (%s); the run continues "
                 "from an earlier one.", step, dst, str(error)[:200])
  _sync(f"fdistill_move_aside_{step}_b")
  mngr.reload()


def _read_config(mngr, step):
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def run_config(workdir):
  """The run's resolved config (its config.json) as a ConfigDict; FileNotFoundError when
  `workdir` is not a training workdir."""
  file = path(workdir, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{workdir} is not a training workdir: no {CONFIG_FILE}.")
  with open(file) as f:
    return ml_collections.ConfigDict(json.load(f))


def saved_config(workdir):
  """The config dict of the newest readable checkpoint of `workdir`, or None."""
  if not os.path.isdir(path(workdir, CHECKPOINTS)):
    return None
  mngr = _reader(workdir)
  try:
    found = newest_readable(mngr.all_steps(), lambda s: _read_config(mngr, s))
  finally:
    mngr.close()
  return None if found is None else found[1]


def check_resumable(workdir, config):
  """Refuses a config that the newest readable checkpoint of `workdir` was not made with
  (`check_compatible`): the check of `restore_latest`, made before any teacher loads."""
  saved = saved_config(workdir)
  if saved is not None:
    check_compatible(saved, config)


def restore_latest(mngr, abstract_state, config, keep_unreadable=False):
  """Restores the newest readable checkpoint; returns the state or None.

  Checkpoints that fail to load (truncated or corrupt files) are skipped with a
  warning, newest first, and moved aside (`move_aside`) unless
  `keep_unreadable`. A checkpoint made with an incompatible config, or whose
  arrays do not fit the run's networks, raises.
  """
  def read(step):
    check_compatible(_read_config(mngr, step), config)
    _check_shapes(mngr, step, abstract_state)
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
  found = newest_readable(mngr.all_steps(), read,
                          None if keep_unreadable else functools.partial(move_aside, mngr))
  if found is None:
    return None
  _LOG.info("Resumed from checkpoint at step %d.", found[0])
  return found[1]


def _saved_shapes(mngr, step):
  """{path: shape} of the saved state, from its metadata; None if unreadable."""
  state_dir = os.path.join(str(mngr.directory), str(step), "state")
  try:
    # The item's handler reads state/_METADATA; a Checkpointer would also look for a
    # checkpoint-level _CHECKPOINT_METADATA there (it is one level up) and warn on every resume.
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
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
  return {"/".join(name(e) for e in p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(mngr, step, abstract_state):
  """Refuses a checkpoint whose arrays do not fit the current networks.

  Without this a mismatch (e.g. a teacher of another size at the same path)
  would look like an unreadable checkpoint, the run would start afresh, and
  keep-last-K would delete the good checkpoints.
  """
  saved = _saved_shapes(mngr, step)
  if saved is None:
    return                        # unreadable: newest_readable skips it
  want = _shapes(abstract_state)
  diffs = [f"{k}: checkpoint {saved.get(k)}, run {want.get(k)}"
           for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  if diffs:
    raise CheckpointError(f"The checkpoint at step {step} does not fit this run's networks "
                          f"({len(diffs)} arrays differ, first: " + "; ".join(diffs[:4]) +
                          "). Use a new --workdir, or the teacher and sizes the run was made "
                          "with.")


def abstract(state):
  """ShapeDtypeStructs (with shardings) describing `state`, for restoring into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


@jax.jit
def _finite_flags(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


def nonfinite_leaves(state) -> list:
  """Paths of the arrays of `state` holding a NaN or an infinity (checked before every save)."""
  flags = jax.device_get(_finite_flags(state))
  return [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
          if not ok]


# ----------------------------------------------------------------------------
# One run per workdir, and the teacher it was made with.


@contextlib.contextmanager
def lock_workdir(workdir):
  """Holds an exclusive lock on WORKDIR/run.lock while a run uses the workdir.

  A second run on the same workdir fails at once with the holder's process id
  and host. The lock (`flock`) dies with its process, so a crash or SIGKILL
  leaves no stale lock. In a multi-process job process 0 holds it.
  """
  if jax.process_index() != 0:
    yield
    return
  fd = os.open(path(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 500).decode(errors="replace").strip() or "another process"
      raise CheckpointError(f"--workdir={workdir} is in use by {holder}; wait for that run to "
                            "end (or stop it), or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
    yield
  finally:
    os.close(fd)


def _same_teacher(saved, current):
  if "sha256" in saved or "sha256" in current:
    return saved.get("sha256") == current.get("sha256")
  return saved == json.loads(json.dumps(current))    # as teacher.json holds it: tuples -> lists


def _describe_teacher(identity):
  if "sha256" in identity:
    return f"{identity.get('path', '?')} (sha256 {str(identity['sha256'])[:12]}...)"
  return json.dumps(identity, sort_keys=True)


def check_teacher(workdir, identity, allow_mismatch=False):
  """Refuses to resume a run with another teacher than the one it was made with.

  The workdir's teacher.json (written at the run's first start) is compared
  with `identity` (a `train.teacher.Teacher.identity`); with `allow_mismatch`
  a difference is only logged.
  """
  file = path(workdir, TEACHER_FILE)
  if not identity or not os.path.isfile(file):
    return
  try:
    saved = _read_json(file, "Teacher record")
  except ValueError as e:
    raise CheckpointError(f"{file} is not valid JSON ({e}); restore it or remove it to "
                          "accept the current teacher.") from None
  if _same_teacher(saved, identity):
    return
  message = (f"the run in {workdir} was made with teacher {_describe_teacher(saved)}, this run "
             f"has {_describe_teacher(identity)}")
  if allow_mismatch:
    _LOG.warning("Resuming although %s (teacher.allow_mismatch=True).", message)
    return
  raise CheckpointError(f"Refusing to resume: {message}. Use a new --workdir, point the config "
                        "back at the original teacher, or pass "
                        "--config.teacher.allow_mismatch=True to continue with this one.")


def write_teacher(workdir, identity):
  if identity:
    atomic.write_json(path(workdir, TEACHER_FILE), identity)

# ----------------------------------------------------------------------------
# The generator alone: reading it from a workdir, exporting it, loading it.


def _read_json(file, what):
  if not os.path.isfile(file):
    raise CheckpointError(f"{what} not found: looked for {file}.")
  try:
    value = limits.json_load(file, f"{what} {file}")
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{what} {file} must hold a JSON object, got a "
                          f"{type(value).__name__}.")
  return value


def _reader(workdir):
  directory = path(workdir, CHECKPOINTS)
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoints in {workdir!r}: looked for {directory}/<step>/state. "
                          "Point --workdir at a training workdir (or an exported generator).")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               item_names=("state", "config"))


def parse_which(which, num_ema):
  """'ema' | 'ema:K' | 'raw' -> ('ema', K) or ('raw', None), checked against num_ema.

  'ema' is the first EMA copy, or the raw generator of a run that keeps none (the
  text-to-image configs, as FastGen's SD configs and DMD2); 'ema:K' needs copy K.
  """
  if which == "raw" or (which == "ema" and not num_ema):
    return "raw", None
  k = 0
  if which.startswith("ema:") and which[4:].isdigit():
    k = int(which[4:])
  elif which != "ema":
    raise CheckpointError(f"which={which!r}; expected 'ema', 'ema:K' or 'raw'.")
  if not num_ema:
    raise CheckpointError(f"which={which!r} but the run keeps no EMA copies (ema_decays is "
                          "empty); use which='raw' (--which=raw).")
  if k >= num_ema:
    raise CheckpointError(f"which={which!r} but the run keeps {num_ema} EMA copies "
                          f"(ema_decays); use 'ema:0'..'ema:{num_ema - 1}' or 'raw'.")
  return "ema", k


def _restore_subtree(state_dir, key):
  """Restores state[key] (and step) as numpy arrays, whatever the saving topology."""
  state_path = epath.Path(state_dir)
  tree = ocp.PyTreeCheckpointHandler().metadata(state_path).tree
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                      {"step": tree["step"], key: tree[key]})
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return ocp.PyTreeCheckpointer().restore(state_path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def _generator_at(mngr, step, which):
  """(params, config dict, step, (kind, k)) from one checkpoint."""
  config = _read_config(mngr, step)
  kind, k = parse_which(which, len(config.get("ema_decays", ())))
  state_dir = os.path.join(str(mngr.directory), str(step), "state")
  restored = _restore_subtree(state_dir, "gen" if kind == "raw" else "ema")
  params = restored["gen"] if kind == "raw" else restored["ema"][k]
  return params, config, int(restored["step"]), (kind, k)


def restore_generator_params(workdir, which="ema", step=None):
  """Generator parameters of a training workdir, without the teacher.

  Args:
    workdir: a training workdir (checkpoints/<step>/{state,config}).
    which: 'ema' (the first EMA copy), 'ema:K' or 'raw'.
    step: checkpoint step; default the newest readable one.

  Returns:
    (params as numpy arrays, info dict: step, which, ema_decay, divergence,
    sigma_init, source).
  """
  mngr = _reader(workdir)
  try:
    available = list(mngr.all_steps())
    if step is not None and int(step) not in available:
      raise CheckpointError(f"No checkpoint at step {step} under {mngr.directory}; "
                            f"available steps: {sorted(available)}.")
    found = newest_readable([int(step)] if step is not None else available,
                            lambda s: _generator_at(mngr, s, which))
  finally:
    mngr.close()
  if found is None:
    what = "readable checkpoint" if available else "complete checkpoint"
    raise CheckpointError(f"No {what} under {path(workdir, CHECKPOINTS)}; train longer or "
                          "wait for the first checkpoint to finish.")
  params, config, saved_step, (kind, k) = found[1]
  info = {"step": saved_step, "which": "raw" if kind == "raw" else f"ema:{k}",
          "ema_decay": None if kind == "raw" else float(config["ema_decays"][k]),
          "divergence": config.get("divergence"),
          "sigma_init": float(config.get("loss", {}).get("sigma_init", DEFAULT_SIGMA_INIT)),
          "source": os.path.abspath(workdir)}
  return params, info


def is_export(directory):
  return os.path.isfile(os.path.join(directory, EXPORT_FILE))


def load_generator(directory, *, student_from_spec, which="ema", step=None):
  """(module, params, info) from an exported directory or a training workdir.

  `which` and `step` select the weights of a training workdir; an exported
  directory holds one set and ignores them. `info` has the export.json fields
  plus 'spec', 'sample_shape' and 'num_classes'. `student_from_spec(spec)` builds
  the module (`registry.student_from_spec` of a `train.registry.Registry`).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"Generator directory {directory!r} does not exist: expected a "
                          f"training workdir ({GENERATOR_SPEC}, {CHECKPOINTS}/) or an exported "
                          f"generator ({GENERATOR_SPEC}, {PARAMS_DIR}/, {EXPORT_FILE}).")
  spec = _read_json(os.path.join(directory, GENERATOR_SPEC), "Generator architecture")
  if is_export(directory):
    info = _read_json(os.path.join(directory, EXPORT_FILE), "Export record")
    params = ocp.StandardCheckpointer().restore(path(directory, PARAMS_DIR))
  else:
    params, info = restore_generator_params(directory, which, step)
  module, sample_shape, num_classes = student_from_spec(spec)
  info = dict(info, spec=spec, sample_shape=list(sample_shape), num_classes=int(num_classes))
  return module, params, info


def generator_kind(directory):
  """The 'kind' of a workdir's or export's generator_spec.json; None when it has none."""
  file = os.path.join(directory, GENERATOR_SPEC)
  if not os.path.isfile(file):
    return None
  spec = limits.json_load(file, f"generator spec {file}")
  if not isinstance(spec, dict):
    raise ValueError(f"generator spec {file} must hold a JSON object, got a "
                     f"{type(spec).__name__}.")
  return spec.get("kind")


def is_run_workdir(directory):
  """True for a training workdir (it holds checkpoints/ or status.json)."""
  return any(os.path.exists(os.path.join(directory, n)) for n in (CHECKPOINTS, STATUS_FILE))


def check_run_target(workdir):
  """Refuses a `train --workdir` that is a non-empty folder but not one of its runs.

  A run's folder holds checkpoints/ or status.json; a run that failed while
  starting up leaves only its lock, logs and event files. Anything else is
  the user's folder, whose config.json / status.json a run would replace.
  """
  if not os.path.isdir(workdir) or is_run_workdir(workdir):
    return
  own = (LOCK_FILE, LOG_FILE, CONFIG_FILE, TEACHER_FILE, GENERATOR_SPEC)
  foreign = sorted(n for n in os.listdir(workdir) if n not in own
                   and not n.startswith(("log_process", "events.out.tfevents")))
  if foreign or any(os.path.exists(path(workdir, n)) for n in
                    (CONFIG_FILE, TEACHER_FILE, GENERATOR_SPEC)):
    shown = foreign or [n for n in (CONFIG_FILE, TEACHER_FILE, GENERATOR_SPEC)
                        if os.path.exists(path(workdir, n))]
    raise CheckpointError(
        f"--workdir={workdir} is a non-empty folder that is not a run of this project (it "
        f"holds {', '.join(shown[:5])} but no {CHECKPOINTS}/ or {STATUS_FILE}): a run would "
        "replace files there. Choose a new or empty folder.")


def check_export_target(workdir, out_dir):
  """Refuses an export target that is, or contains, a run workdir (it would be replaced)."""
  try:
    atomic.check_not_inside(out_dir, [workdir], "the run workdir")
  except atomic.OutputError as e:
    raise CheckpointError(f"--export={out_dir} is (or contains) the run workdir {workdir}: "
                          "exporting there would replace its checkpoints; choose a directory "
                          "outside it.") from e
  if os.path.isdir(out_dir) and is_run_workdir(out_dir):
    raise CheckpointError(f"--export={out_dir} is a training workdir ({CHECKPOINTS}/ or "
                          f"{STATUS_FILE} inside); choose another directory.")


def export_generator(workdir, out_dir, *, which="ema", step=None, overwrite=False):
  """Writes the generator alone: generator_spec.json, params/ (orbax), export.json.

  The directory appears complete or not at all (`io.atomic.write_dir`). EMA
  weights by default (`which` as in `restore_generator_params`).

  Returns:
    The absolute path of `out_dir`.
  """
  spec = _read_json(path(workdir, GENERATOR_SPEC), "Generator architecture")
  check_export_target(workdir, out_dir)
  atomic.check_output_dir(os.path.abspath(out_dir), overwrite, "export")
  params, info = restore_generator_params(workdir, which, step)

  def fill(tmp):
    atomic.write_json(os.path.join(tmp, GENERATOR_SPEC), spec)
    atomic.write_json(os.path.join(tmp, EXPORT_FILE), info)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(tmp) / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
  return atomic.write_dir(out_dir, fill, overwrite=overwrite, tool="fdistill_jax.tools.sample",
                          what="export")

