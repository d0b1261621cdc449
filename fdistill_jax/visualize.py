"""Periodic one-step samples from fixed noise and labels, written as PNGs."""

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import multihost_utils
import numpy as np

from fdistill_jax import steps


class Visualizer:
  """Writes workdir/samples/step_NNNNNNN.png from the generator's first EMA copy."""

  def __init__(self, trainer, workdir):
    self.trainer, self.dir = trainer, os.path.join(workdir, "samples")
    config, models = trainer.config, trainer.models
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    n = config.num_sample_images
    self.noise = jax.random.normal(rng, (n,) + models.sample_shape)
    self.labels = steps.random_labels(jax.random.fold_in(rng, 1), n, models.num_classes)
    replicated = NamedSharding(trainer.mesh, P())
    self.noise, self.labels = jax.device_put((self.noise, self.labels), replicated)
    self._generate = jax.jit(lambda p, z, c: steps.generate(models, p, z, c,
                                                            config.loss.sigma_init))

  def samples(self):
    st = self.trainer.state
    params = st.ema[0] if st.ema else st.gen
    out = self._generate(params, self.noise, self.labels)   # every process takes part
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  def __call__(self, step):
    from fdistill_jax import plots  # pylint: disable=g-import-not-at-top
    images = self.samples()
    if jax.process_index() != 0:
      return None
    os.makedirs(self.dir, exist_ok=True)
    path = os.path.join(self.dir, f"step_{step:07d}.png")
    if images.ndim == 4:
      plots.save_image_grid(images, path, ncols=int(np.ceil(np.sqrt(len(images)))))
    return path
