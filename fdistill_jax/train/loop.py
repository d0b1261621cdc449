"""Mesh, sharded initialisation, jitted steps and the training loop.

`train_and_evaluate(config, workdir)` is the whole job: it checks the config,
loads the frozen teacher, builds (or resumes) the TrainState sharded over a
`jax.sharding.Mesh` of all devices, and runs Algorithm 1 of the paper: a
critic step (fake score + discriminator) every iteration and a generator step
every `fake_score_update_freq` iterations. Nothing in a step assumes a single
process: each process feeds its share of the global batch.
"""

import functools
import json
import logging
import os
import signal

from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill_jax import checkpoint as ckpt_lib
from fdistill_jax import data as data_lib
from fdistill_jax import divergences
from fdistill_jax import models as models_lib
from fdistill_jax import state as state_lib
from fdistill_jax import steps
from fdistill_jax import visualize

BATCH_AXES = ("data", "fsdp")


def make_mesh(config, devices=None):
  """A (data, fsdp) mesh over all devices; fsdp=1 keeps parameters replicated."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1, config.mesh.fsdp), BATCH_AXES)


def param_sharding(mesh, leaf):
  """Shards a leaf's largest axis divisible by the fsdp size; else replicates."""
  n = mesh.shape["fsdp"]
  shape = getattr(leaf, "shape", ())
  if n == 1 or not shape:
    return NamedSharding(mesh, P())
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % n == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def tree_sharding(mesh, tree):
  return jax.tree.map(functools.partial(param_sharding, mesh), tree)


def itstime(step, every, total, last=True):
  """True when periodic work is due after `step` completed iterations."""
  return (every > 0 and step % every == 0) or (last and step == total)


def _check(ok, msg):
  if not ok:
    raise ValueError(msg)


def validate_config(config, num_devices, process_count=1):
  """Fails before any compilation, saying what to change."""
  b = config.batch_size
  _check(b > 0 and b % num_devices == 0,
         f"batch_size={b} does not divide the {num_devices} devices; set "
         f"--config.batch_size to a multiple of {num_devices}.")
  _check(b % process_count == 0,
         f"batch_size={b} does not divide the {process_count} processes.")
  _check(config.mesh.fsdp >= 1 and num_devices % config.mesh.fsdp == 0,
         f"mesh.fsdp={config.mesh.fsdp} must be >= 1 and divide the {num_devices} devices.")
  divergences.get_divergence(config.divergence)   # ValueError listing the names
  _check(config.total_steps > 0, f"total_steps={config.total_steps} must be positive.")
  _check(config.fake_score_update_freq >= 1,
         f"fake_score_update_freq={config.fake_score_update_freq} must be >= 1.")
  for name in ("gen_lr", "fake_lr", "disc_lr"):
    _check(config.optim[name] > 0, f"optim.{name}={config.optim[name]} must be positive.")
  _check(config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0.")
  lc = config.loss
  for name in ("fdistill_weight", "gan_weight", "r1_gamma"):
    _check(lc[name] >= 0, f"loss.{name}={lc[name]} must be >= 0.")
  _check(lc.fdistill_weight > 0 or lc.gan_weight > 0,
         "loss.fdistill_weight and loss.gan_weight are both 0: nothing would train.")
  _check(0 <= lc.min_index < lc.max_index <= lc.num_sigmas,
         f"need 0 <= loss.min_index ({lc.min_index}) < loss.max_index ({lc.max_index}) "
         f"<= loss.num_sigmas ({lc.num_sigmas}).")
  _check(0 < lc.sigma_min < lc.sigma_max, "need 0 < loss.sigma_min < loss.sigma_max.")
  _check(lc.time_weighting in ("dmd", "none"),
         f"loss.time_weighting={lc.time_weighting!r}; expected 'dmd' or 'none'.")
  _check(config.disc.features_from in ("teacher", "fake_score"),
         f"disc.features_from={config.disc.features_from!r}; expected 'teacher' or 'fake_score'.")
  _check(len(config.disc.resolutions) > 0, "disc.resolutions is empty.")
  _check(config.eval.fid_every <= 0 or (config.eval.inception and config.eval.ref),
         "eval.fid_every > 0 needs eval.inception (Inception weights) and eval.ref "
         "(reference statistics .npz); set both or set eval.fid_every=0.")
  _check(all(0 <= d < 1 for d in config.ema_decays),
         f"ema_decays={tuple(config.ema_decays)} must each lie in [0, 1).")


class Trainer:
  """Holds the mesh, the jitted steps and the sharded state of one run."""

  def __init__(self, config, source=None, devices=None):
    self.config = config
    self.mesh = make_mesh(config, devices)
    self.models, self.teacher_vars, student_params = models_lib.build(config)
    self.initial_params = student_params      # generator / fake score start here
    self.optimizers = state_lib.make_optimizers(config.optim)
    self.source = source if source is not None else make_source(config)
    _check_source(self.source, self.models)
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.teacher_vars = jax.device_put(self.teacher_vars,
                                       tree_sharding(self.mesh, self.teacher_vars))
    self._init_state(student_params)
    kw = dict(models=self.models, optimizers=self.optimizers, config=config)
    repl = NamedSharding(self.mesh, P())
    teacher_sh = tree_sharding(self.mesh, self.teacher_vars)
    self.gen_step = jax.jit(functools.partial(steps.generator_step, **kw),
                            in_shardings=(self.state_sharding, teacher_sh),
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
                                    len(config.ema_decays))
    shapes = jax.eval_shape(init, student_params, heads_params)
    self.state_sharding = tree_sharding(self.mesh, shapes)
    self.state = jax.jit(init, out_shardings=self.state_sharding)(student_params, heads_params)

  def to_global(self, local):
    """This process's rows of a batch -> global jax.Arrays sharded over the mesh."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(a)), local)

  def batches(self, start):
    """Prefetched global batches from `start` on; each process reads its own rows."""
    return data_lib.Prefetcher(
        self.source, start, global_batch_size=self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        buffer_size=self.config.data.prefetch, transform=self.to_global)

  def iteration(self, step, batch):
    """Iteration `step` of Algorithm 1; returns its metrics (device arrays, not synced)."""
    metrics = {}
    if step % self.config.fake_score_update_freq == 0:
      self.state, metrics = self.gen_step(self.state, self.teacher_vars)
    self.state, critic_metrics = self.critic_step(self.state, self.teacher_vars, batch)
    return {**metrics, **critic_metrics}

  @property
  def step(self):
    return int(jax.device_get(self.state.step))


def make_source(config):
  """The config's data source; the toy teacher brings its own."""
  if config.data.kind == "toy":
    from fdistill_jax import toy_demo  # pylint: disable=g-import-not-at-top
    return toy_demo.make_source(config)
  return data_lib.make_source(config.data)


def _check_source(source, models):
  if tuple(source.image_shape) != tuple(models.sample_shape):
    raise ValueError(f"The data source yields samples of shape {tuple(source.image_shape)} "
                     f"but the teacher expects {tuple(models.sample_shape)}; point the data "
                     "config at a dataset of the teacher's resolution and channels.")
  if source.num_classes != models.num_classes:
    raise ValueError(f"The data source has {source.num_classes} classes but the teacher's "
                     f"label_dim is {models.num_classes}.")


def check_finite(metrics, step):
  """Stops the run on a non-finite loss or gradient norm, naming step and term."""
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
  if bad:
    raise FloatingPointError(
        f"Non-finite values at step {step} in: {', '.join(sorted(bad))}. The last good "
        "checkpoint is kept; lower the learning rates or enable loss.logit_clip.")


class _Preemption:
  """Turns SIGTERM (TPU / SLURM preemption) into a flag the loop checks."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:      # not the main thread: no handler
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics):
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out.update({f"{k}_{i}": float(x) for i, x in enumerate(v.reshape(-1))})
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, source=None):
  """Runs (or resumes) a distillation run in `workdir`; returns the final TrainState."""
  return run(build_trainer(config, source), workdir)


def build_trainer(config, source=None):
  """Checks the config (before any compilation) and builds the Trainer."""
  config = ml_collections.FrozenConfigDict(config)
  validate_config(config, jax.device_count(), jax.process_count())
  return Trainer(config, source)


def run(trainer, workdir):
  """The training loop: resume, iterate, log, sample, checkpoint; SIGTERM saves and stops."""
  with _Preemption() as preempt:      # first, so a SIGTERM during start-up still saves
    mngr = _resume(trainer, workdir)
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    try:
      _loop(trainer, workdir, mngr, writer, preempt)
    finally:
      mngr.wait_until_finished()
      mngr.close()
      writer.flush()
  return trainer.state


def _resume(trainer, workdir):
  """Records the generator's architecture and restores the newest readable checkpoint."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "generator_spec.json"),
                models_lib.student_spec(trainer.config))
  mngr = ckpt_lib.manager(workdir, trainer.config)
  restored = ckpt_lib.restore_latest(mngr, ckpt_lib.abstract(trainer.state), trainer.config)
  if restored is not None:
    trainer.state = restored
  return mngr


def _loop(trainer, workdir, mngr, writer, preempt):
  config, step = trainer.config, trainer.step
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_secs=10.0)
  viz = visualize.Visualizer(trainer, workdir)
  fid = visualize.PeriodicFID(trainer) if config.eval.fid_every > 0 else None
  if step == 0:
    writer.write_hparams(_scalars_config(config))
  with trainer.batches(step) as batches:
    pending = None
    while step < config.total_steps:
      metrics = trainer.iteration(step, next(batches))
      if pending is not None:         # check the previous step while this one runs
        check_finite(jax.device_get(pending), step)
      pending, step = metrics, step + 1
      report(step)
      if itstime(step, config.log_every, config.total_steps):
        _log(writer, trainer, metrics, step)
      if itstime(step, config.sample_every, config.total_steps):
        viz(step)
      if fid is not None and itstime(step, config.eval.fid_every, config.total_steps):
        writer.write_scalars(step, {"eval/fid": fid()})
      if itstime(step, config.checkpoint_every, config.total_steps) or preempt.requested:
        check_finite(jax.device_get(metrics), step)
        ckpt_lib.save(mngr, step, trainer.state, config)
      if preempt.requested:
        break


def _write_json(path, obj):
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _log(writer, trainer, metrics, step):
  metrics = jax.device_get(metrics)
  check_finite(metrics, step)
  scalars = _scalars(metrics)
  optim = trainer.config.optim
  for name in ("gen_lr", "fake_lr", "disc_lr"):
    scalars[f"lr/{name}"] = float(state_lib.learning_rate_schedule(optim[name], optim)(step))
  writer.write_scalars(step, scalars)


def _scalars_config(config):
  flat = {}
  def visit(prefix, node):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        visit(f"{prefix}{k}.", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[f"{prefix}{k}"] = v
  visit("", config)
  return flat
