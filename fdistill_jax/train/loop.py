"""Mesh, sharded initialisation, jitted steps and the training loop.

`train_and_evaluate(config, workdir)` is the whole job: it checks the config
and the workdir, builds the training method `config.method` names (`METHODS`),
resumes its state from the newest checkpoint, and runs its iterations,
evaluators, checkpoints and preemption handling. Methods: 'fdistill'
(`Trainer`, below) loads the frozen teacher from the registry, builds the
TrainState sharded over a `jax.sharding.Mesh` of all devices, and runs
Algorithm 1 of the paper: a critic step (fake score + discriminator) every
iteration and a generator step every `fake_score_update_freq` iterations;
'edm' (`train.denoiser_training`) trains an EDM denoiser, a teacher, with EDM's own loss.
Nothing in a step assumes a single process: each process feeds its share of
the global batch. The loop knows no problem by name: teacher, data and
evaluators come from the registry it is given (`train.registry`).
"""

import functools
import json
import logging
import os
import signal
import tempfile
import time

from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fdistill_jax import config_lib
from fdistill_jax.train import evaluators as evaluators_lib
from fdistill_jax.io import atomic
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax import console
from fdistill_jax.train import denoiser_training as edm_method
from fdistill_jax.train import models as models_lib
from fdistill_jax.train import noise
from fdistill_jax.train import runner
from fdistill_jax.train import state as state_lib
from fdistill_jax.train import steps
from fdistill_jax.train import teacher as teacher_lib
from fdistill_jax.train import warm_start
# The mesh helpers live in `train.runner` (shared by every method); re-exported here.
from fdistill_jax.train.runner import BATCH_AXES, make_mesh, param_sharding, tree_sharding  # noqa: F401
PREEMPTED_EXIT_CODE = 143     # 128 + SIGTERM: "stopped on request", state saved
_LOG = logging.getLogger(__name__)


class Preempted(Exception):
  """The run was asked to stop (SIGTERM), saved its state and stopped early."""

  def __init__(self, step, during_startup=False):
    super().__init__(
        f"Preempted during start-up at step {step}: nothing new to save; run the same command "
        "again to continue." if during_startup else
        f"Preempted at step {step}: the state is saved in the workdir; run the same command "
        "again to resume.")
    self.step = step


class Trainer(runner.Runner):
  """The 'fdistill' method: the mesh, the jitted steps and the sharded state of one run."""

  def __init__(self, config, source=None, devices=None, teacher=None, *, registry):
    self.config, self.registry = config, registry
    self.mesh = make_mesh(config, devices)
    if teacher is None:
      teacher = runner.load_teacher(config, registry)
    noise.check_teacher(config, teacher.spec.get("sigmas"))
    self.models = models_lib.from_teacher(teacher, config.disc, config.student_dropout)
    self.spec = teacher.spec
    self.teacher_identity = teacher.identity
    self.initial_params = teacher.student_params      # generator / fake score start here
    self.optimizers = state_lib.make_optimizers(config.optim)
    self.source = source if source is not None else registry.source(config.data)
    self.models.conditioning.check_source(self.source, config)
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    frozen = teacher_lib.frozen_variables(teacher.variables, config)   # frozen_dtype storage
    teacher_sh = tree_sharding(self.mesh, frozen)
    self.teacher_vars = jax.device_put(frozen, teacher_sh)
    self._init_state(teacher.student_params)
    self._compiled = set()
    kw = dict(models=self.models, optimizers=self.optimizers, config=config,
              sharding=self.batch_sharding)
    repl = NamedSharding(self.mesh, P())
    # The generator step reads the batch's conditioning only (text teachers); None is fine.
    self.gen_step = jax.jit(functools.partial(steps.generator_step, **kw),
                            in_shardings=(self.state_sharding, teacher_sh,
                                          self.batch_sharding),
                            out_shardings=(self.state_sharding, repl), donate_argnums=0)
    self.critic_step = jax.jit(functools.partial(steps.critic_step, **kw),
                               in_shardings=(self.state_sharding, teacher_sh,
                                             self.batch_sharding),
                               out_shardings=(self.state_sharding, repl), donate_argnums=0)

  def _init_state(self, student_params):
    config, models = self.config, self.models
    rng = jax.random.PRNGKey(config.seed)
    heads_params = models_lib.init_heads(models, self.teacher_vars, jax.random.fold_in(rng, 1))
    # Host-local values (identical on every process) -> replicated global arrays.
    student_params, heads_params = jax.device_put(
        (student_params, heads_params), NamedSharding(self.mesh, P()))
    def init(student, heads):
      return state_lib.create_state(rng, student, student, heads, self.optimizers,
                                    len(config.ema_decays), config.loss.num_bins)
    shapes = jax.eval_shape(init, student_params, heads_params)
    self.state_sharding = tree_sharding(self.mesh, shapes)
    self.state = jax.jit(init, out_shardings=self.state_sharding)(student_params, heads_params)

  def iteration(self, step, batch):
    """Iteration `step` of Algorithm 1; returns its metrics (device arrays, not synced)."""
    metrics = {}
    if step % self.config.fake_score_update_freq == 0:
      with self._first_call("generator step"):
        self.state, metrics = self.gen_step(self.state, self.teacher_vars, batch)
    with self._first_call("critic step (fake score + discriminator)"):
      self.state, critic_metrics = self.critic_step(self.state, self.teacher_vars, batch)
    return {**metrics, **critic_metrics}

  def eval_params(self):
    """The `params` dict evaluators receive ('generator', 'raw', 'fake', 'disc')."""
    return evaluators_lib.as_params(self.state)

  def samplers(self):
    """The one-step generator (`generator` params, sigma_init from the config)."""
    return (evaluators_lib.one_step_sampler(self.models, self.config.loss.sigma_init),)


# config.method -> the class that trains it (see `train.runner` for the interface).
METHODS = {"fdistill": Trainer, "edm": edm_method.EDMTrainer}


def make_trainer(config, source=None, devices=None, teacher=None, *, registry):
  """The training method `config.method` names, built (teacher loaded, state initialised);
  teacher, data source and evaluators come from `registry` (a `train.registry.Registry`)."""
  method = config.get("method", "fdistill")
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {sorted(METHODS)} (fdistill: distil "
                     "a teacher; edm: train an EDM teacher from data).")
  return METHODS[method](config, source, devices=devices, teacher=teacher, registry=registry)


def check_finite(metrics, step):
  """Stops the run on a non-finite loss or gradient norm, naming step and term."""
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
  if bad:
    raise FloatingPointError(
        f"Non-finite values at step {step} in: {', '.join(sorted(bad))}. The last good "
        "checkpoint is kept; lower the learning rates or enable loss.logit_clip.")


def check_state_finite(state, step, last_saved):
  """Refuses to save a state with any non-finite array (every saved checkpoint is good)."""
  bad = ckpt_lib.nonfinite_leaves(state)
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint was written")
    raise FloatingPointError(
        f"Non-finite values at step {step} in {len(bad)} arrays of the training state (first: "
        f"{', '.join(bad[:3])}); nothing was saved and {kept}. Lower the learning rates or "
        "enable loss.logit_clip.")


class _SigtermFlag:
  """Single-process preemption: SIGTERM sets a flag the loop checks each iteration.

  In a multi-process job JAX's preemption service owns SIGTERM and orbax's
  `reached_preemption(step)` tells every process the same step to stop at, so
  no Python handler is installed there.
  """

  def __init__(self):
    self.requested, self._previous = False, None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:      # not the main thread: no handler
        self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    _LOG.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_workdir(workdir, foreign_ok=True):
  """Fails at once, before the teacher loads, when the workdir cannot be written (or, unless
  `foreign_ok`, is a non-empty folder that is not a run: `checkpoint.check_run_target`)."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} exists and is not a directory; pass a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be created ({e.strerror}); choose a "
                     "writable location.") from e
  try:                    # os.access says yes to root on a read-only file system: try it
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror}); choose a writable "
                     "location.") from None
  if not foreign_ok and jax.process_index() == 0:   # the others may see process 0's files
    ckpt_lib.check_run_target(workdir)
  return workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, registry,
                       source=None, teacher=None, foreign_ok=True):
  """Runs (or resumes) a distillation run in `workdir`; returns the final TrainState.

  `registry` (a `train.registry.Registry`; `fdistill_jax.plugins.default_registry()`
  has every problem) supplies the teacher, data source and evaluators the config
  names. The config, the workdir and (on a resume) the config against the checkpoint's
  are checked before the teacher is loaded.
  `source` (a data source) and `teacher` (a `train.teacher.Teacher`) replace
  the ones the config names, e.g. to share one fitted teacher across a sweep.
  `foreign_ok=False` (the command line) refuses a non-empty workdir that is not a run.

  Raises:
    Preempted: SIGTERM arrived; the state was saved first.
  """
  config = _validated(config, registry)
  workdir = check_workdir(workdir, foreign_ok)
  with _SigtermFlag() as sigterm, ckpt_lib.lock_workdir(workdir), \
      console.log_to_file(_log_path(workdir)):
    ckpt_lib.check_resumable(workdir, config)
    console.say("Building the run in %s (teacher: %s) ...", workdir, config.teacher.kind)
    trainer = make_trainer(config, source, teacher=teacher, registry=registry)
    return _run(trainer, workdir, sigterm)


def build_trainer(config, source=None, teacher=None, *, registry):
  """Checks the config (before any teacher is loaded) and builds its method's trainer."""
  return make_trainer(_validated(config, registry), source, teacher=teacher, registry=registry)


def run(trainer, workdir):
  """The loop of an already built Trainer (see `train_and_evaluate`)."""
  workdir = check_workdir(workdir)
  with _SigtermFlag() as sigterm, ckpt_lib.lock_workdir(workdir), \
      console.log_to_file(_log_path(workdir)):
    return _run(trainer, workdir, sigterm)


def _validated(config, registry):
  config = ml_collections.FrozenConfigDict(config)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  registry.check(config)
  return config


def _log_path(workdir):
  name = ckpt_lib.LOG_FILE if jax.process_index() == 0 else (
      f"log_process{jax.process_index()}.txt")
  return os.path.join(workdir, name)


def _stop_if_requested(sigterm, trainer, workdir=None):
  """SIGTERM during start-up: stop before the loop (exit 143), saving nothing new."""
  if sigterm.requested:
    if workdir is not None and jax.process_index() == 0:
      ckpt_lib.write_status(workdir, "preempted", trainer.step)
    error = Preempted(trainer.step, during_startup=True)
    _LOG.warning("%s", error)
    raise error


def _run(trainer, workdir, sigterm):
  config = trainer.config
  _LOG.info("Resolved config (also in %s):\n%s", ckpt_lib.CONFIG_FILE, config)
  console.say("Config: %s", config_lib.summary(config))
  console.say("  (every field: %s and %s in the workdir)", ckpt_lib.CONFIG_FILE,
              os.path.basename(_log_path(workdir)))
  _stop_if_requested(sigterm, trainer)
  mngr = ckpt_lib.manager(workdir, config)
  started = False            # the resume checks passed and the run files are written
  try:
    if mngr.all_steps():
      ckpt_lib.check_teacher(workdir, trainer.teacher_identity,
                              config.teacher.get("allow_mismatch", False))
    restored = ckpt_lib.restore_latest(mngr, ckpt_lib.abstract(trainer.state), config)
    if restored is not None:
      trainer.state = restored
    elif config.get("init_from"):
      trainer.state = warm_start.warm_start(trainer.state, config.init_from)
    else:
      warm_start.advise(config)
    _write_run_files(trainer, workdir)
    started = True
    _stop_if_requested(sigterm, trainer, workdir)
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    with metric_writers.ensure_flushes(writer):
      _loop(trainer, workdir, mngr, writer, sigterm)
  except BaseException as e:
    if started and not isinstance(e, Preempted):
      _record_failure(workdir, trainer.step, e)
    raise
  finally:
    _close_manager(mngr, workdir)
  return trainer.state


def _record_failure(workdir, step, error):
  """status.json says the run failed (disk full, vanished data, ...) and why, in one line."""
  _LOG.info("The run failed at step %d", step, exc_info=error)    # the log file only
  if jax.process_index() != 0:
    return
  state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
  reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
  try:
    ckpt_lib.write_status(workdir, state, step, error=reason)
  except OSError:                      # a full disk: the small file may still fit in place
    try:
      with open(ckpt_lib.path(workdir, ckpt_lib.STATUS_FILE), "w", encoding="utf-8") as f:
        json.dump({"state": state, "step": int(step), "error": reason}, f)
    except OSError:
      _LOG.error("could not record the failure in %s", ckpt_lib.STATUS_FILE)


def _close_manager(mngr, workdir):
  """Waits for pending saves and closes; a failed save leaves no temporary folder behind."""
  try:
    mngr.wait_until_finished()
  finally:
    try:
      mngr.close()
    finally:
      if jax.process_index() == 0:
        ckpt_lib.remove_temporary_checkpoints(workdir)


def _write_run_files(trainer, workdir):
  """generator_spec.json, config.json and status.json, after the resume checks passed."""
  if jax.process_index() != 0:
    return
  atomic.write_json(ckpt_lib.path(workdir, ckpt_lib.GENERATOR_SPEC), trainer.spec)
  atomic.write_json(ckpt_lib.path(workdir, ckpt_lib.CONFIG_FILE),
                    json.loads(trainer.config.to_json()))
  ckpt_lib.write_teacher(workdir, trainer.teacher_identity)
  ckpt_lib.write_status(workdir, "running", trainer.step)


class _Averages:
  """Means of each metric since the last report (a metric appears when it was computed)."""

  def __init__(self):
    self.sums, self.counts = {}, {}

  def add(self, metrics):
    for k, v in metrics.items():
      self.sums[k] = self.sums[k] + v if k in self.sums else v
      self.counts[k] = self.counts.get(k, 0) + 1

  def pop(self):
    values = jax.device_get(self.sums)
    out = {k: np.asarray(v) / self.counts[k] for k, v in values.items()}
    self.sums, self.counts = {}, {}
    return out


def _scalars(metrics):
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out.update({f"{k}_{i}": float(x) for i, x in enumerate(v.reshape(-1))})
  return out


def _evaluator_actions(trainer, workdir, writer):
  """Each evaluator wrapped in a clu PeriodicCallback at its period and the last step."""
  config = trainer.config
  ctx = evaluators_lib.EvalContext(
      config=config, workdir=workdir, models=trainer.models, teacher_vars=trainer.teacher_vars,
      devices=tuple(trainer.mesh.devices.flat), writer=writer,
      initial_params=trainer.initial_params,
      samples_dir=ckpt_lib.path(workdir, ckpt_lib.SAMPLES), samplers=trainer.samplers())
  actions = []
  for name, ev in evaluators_lib.build(config.eval.evaluators, ctx,
                                       trainer.registry.evaluators):
    def run(step, t, name=name, ev=ev):
      del t
      console.say("Evaluating '%s' at step %d ...", name, step)
      scalars = ev(trainer.eval_params(), step)
      if scalars:
        writer.write_scalars(step, scalars)
        console.say("  %s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())))
    actions.append(periodic_actions.PeriodicCallback(
        every_steps=ev.every or None, on_steps=[config.total_steps] if ev.at_end else [],
        callback_fn=run))
  return actions


def _loop(trainer, workdir, mngr, writer, sigterm):
  config, step = trainer.config, trainer.step
  averages, start = _Averages(), step
  progress = console.Progress(config.total_steps, step, writer=writer)
  log_action = periodic_actions.PeriodicCallback(
      every_steps=config.log_every, on_steps=[config.total_steps],
      callback_fn=lambda step, t: writer.write_scalars(step, _scalars(averages.pop())))
  evaluators = _evaluator_actions(trainer, workdir, writer)
  if step == 0:
    writer.write_hparams(config_lib.flat_scalars(config))
  console.say("Running from step %d of %d (the first iteration compiles) ...", step,
              config.total_steps)
  started = time.time()
  with trainer.batches(step) as batches:
    pending = None
    while step < config.total_steps:
      metrics = trainer.iteration(step, next(batches))
      if pending is not None:         # check the previous step while this one runs
        check_finite(jax.device_get(pending), step)
      pending, step = metrics, step + 1
      averages.add(metrics)
      if step == start + 1:
        console.say("First iteration done in %s (compilation included); %d to go.",
                    console.format_duration(time.time() - started), config.total_steps - step)
      log_action(step)
      progress(step, metrics)
      for action in evaluators:
        action(step)
      preempted = sigterm.requested or mngr.reached_preemption(step)
      if preempted or mngr.should_save(step):
        check_finite(jax.device_get(metrics), step)
        check_state_finite(trainer.state, step, mngr.latest_step())
        ckpt_lib.save(mngr, step, trainer.state, config, force=True)
      if preempted:
        mngr.wait_until_finished()
        if jax.process_index() == 0:
          ckpt_lib.write_status(workdir, "preempted", step)
        error = Preempted(step)
        _LOG.warning("%s", error)
        raise error
  mngr.wait_until_finished()
  trainer.finish(workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_status(workdir, "finished", step)
  console.say("Finished at step %d; checkpoints, logs and results are in %s.", step, workdir)
