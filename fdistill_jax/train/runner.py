"""What every training method shares: the mesh, parameter sharding, global batches.

A training *method* (`loop.METHODS`: 'fdistill' distils a teacher, 'edm'
trains one) is a class built as `Method(config, source, devices=..., teacher=...,
registry=...)`
that mixes in `Runner` and provides

  state            the sharded training state (a pytree orbax checkpoints)
  iteration(step, batch) -> metrics      one iteration of its algorithm
  models, teacher_vars, initial_params   what evaluators may use (`EvalContext`)
  spec             the JSON description of the network it trains
  eval_params()    the `params` dict evaluators receive
  samplers()       how that network makes samples (`eval.sampling.ModelSampler`s)
  finish(workdir)  work after the last iteration (e.g. exporting a teacher)

and sets `config`, `registry` (the `train.registry.Registry` the run looks its
teacher, data source and evaluators up in), `mesh`, `source`, `batch_sharding` and
`_compiled` (a set),
which the `Runner` methods below use. The loop (`train.loop`) knows methods only
through this interface.
"""

import contextlib
import functools
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill_jax import console
from fdistill_jax.data import sources as data_sources

BATCH_AXES = ("data", "fsdp")


def make_mesh(config, devices=None):
  """A (data, fsdp) mesh over all devices; fsdp=1 keeps parameters replicated."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1, config.mesh.fsdp), BATCH_AXES)


def fsdp_axis(shape, n):
  """The axis FSDP over n devices shards: the largest divisible by n; None: replicated."""
  if n == 1 or not shape:
    return None
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % n == 0:
      return i
  return None


def param_sharding(mesh, leaf):
  """Shards a leaf's largest axis divisible by the fsdp size; else replicates."""
  shape = getattr(leaf, "shape", ())
  axis = fsdp_axis(shape, mesh.shape["fsdp"])
  if axis is None:
    return NamedSharding(mesh, P())
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def tree_sharding(mesh, tree):
  return jax.tree.map(functools.partial(param_sharding, mesh), tree)


def load_teacher(config, registry):
  """The teacher the config names (from `registry`, a `train.registry.Registry`), saying
  how long it took."""
  start = time.time()
  console.say("Loading the teacher (%s%s) ...", config.teacher.kind,
              f": {config.teacher.path}" if config.teacher.path else "")
  teacher = registry.teacher(config)
  console.say("Teacher ready in %s.", console.format_duration(time.time() - start))
  return teacher


class Runner:
  """Batches, compile reporting and the step counter, shared by every method."""

  def to_global(self, local):
    """This process's rows of a batch -> global jax.Arrays sharded over the mesh."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(a)), local)

  def batches(self, start):
    """Prefetched global batches from `start` on; each process reads its own rows."""
    host = self.models.conditioning.host     # e.g. captions -> token ids, on the host
    return data_sources.Prefetcher(
        self.source, start, global_batch_size=self.config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        buffer_size=self.config.data.prefetch,
      transform=lambda b: self.to_global(host(b)))

  @contextlib.contextmanager
  def _first_call(self, what):
    """Says what compiles and how long it took (the first call of a jitted step traces
    and compiles it, or loads it from JAX's compilation cache; dispatch is async)."""
    if what in self._compiled:
      yield
      return
    console.say("Compiling the %s ...", what)
    start = time.time()
    yield
    self._compiled.add(what)
    console.say("  compiled the %s in %s.", what, console.format_duration(time.time() - start))

  @property
  def step(self):
    return int(jax.device_get(self.state.step))

  def finish(self, workdir):
    """Work after the last iteration (nothing by default)."""
    del workdir
