"""One jitted function over a batch sharded on every device: the home of data parallelism
outside training.

`ShardedFn(fn, num_batch_args)` jits fn(variables, *batch) on a 1-D ('data',)
mesh of `devices` (default: all devices of all processes): the variables are
replicated, every batch argument and every output is split along its leading
axis. The batch must be a multiple of `num_devices` (`round_up`). The sampler
(`sampling.BatchSampler`), FID's Inception features, DINO features and CLIP
scores all run through it; training shards with its own 2-D mesh
(`train.runner.make_mesh`).
"""

import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def round_up(batch: int, num_devices: int) -> int:
  """The smallest multiple of `num_devices` that is >= batch (and >= 1)."""
  return math.ceil(max(int(batch), 1) / num_devices) * num_devices


class ShardedFn:
  """fn(variables, *batch) jitted with replicated variables and data-sharded batch and outputs.

  Attributes:
    mesh: the 1-D ('data',) mesh.
    replicated, data: its shardings for the variables and for batch arrays.
    num_devices: the mesh size; batches are a multiple of it.
  """

  def __init__(self, fn: Callable, num_batch_args: int = 1, devices=None, *,
               replicated_args: int = 1):
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
      raise ValueError("ShardedFn needs at least one device.")
    self.mesh = Mesh(np.asarray(devices), (DATA,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P(DATA))
    self.num_devices = len(devices)
    in_shardings = (self.replicated,) * replicated_args + (self.data,) * num_batch_args
    self._fn = jax.jit(fn, in_shardings=in_shardings, out_shardings=self.data)

  def replicate(self, tree):
    """`tree` placed on every device of the mesh (do it once, then call with it)."""
    return jax.device_put(tree, self.replicated)

  def round_up(self, batch: int) -> int:
    """The smallest multiple of the device count that is >= batch (and >= 1)."""
    return round_up(batch, self.num_devices)

  def __call__(self, *args):
    return self._fn(*args)
