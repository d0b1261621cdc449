"""Periodic work on the generator: PNG grids of one-step samples, FID."""

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


class PeriodicFID:
  """FID of `config.eval.num_samples` one-step samples (first EMA copy) against
  EDM-format reference statistics (`config.eval.ref`), with the Inception
  weights in `config.eval.inception`; enabled by `config.eval.fid_every > 0`."""

  def __init__(self, trainer):
    from fdistill_jax import evaluate  # pylint: disable=g-import-not-at-top
    ec = trainer.config.eval
    if not ec.inception or not ec.ref:
      raise ValueError("eval.fid_every > 0 needs eval.inception (Inception weights) and "
                       "eval.ref (reference statistics .npz); set both or set fid_every=0.")
    self.trainer, self.num = trainer, ec.num_samples
    self.ref = evaluate.load_reference_stats(ec.ref)
    self.feature_fn = evaluate.load_feature_fn(ec.inception)
    self._evaluate = evaluate

  def __call__(self):
    return float(self._evaluate.fid_from_samples(self.samples(), self.ref["mu"],
                                                 self.ref["sigma"], self.feature_fn))

  def samples(self):
    """The `num_samples` images FID is computed on (same noise at every evaluation)."""
    t = self.trainer
    st = t.state
    params = st.ema[0] if st.ema else st.gen
    batch = t.config.batch_size
    gen = jax.jit(lambda p, z, c: steps.generate(t.models, p, z, c, t.config.loss.sigma_init))
    images = []
    for i in range(0, self.num, batch):
      rng = jax.random.fold_in(jax.random.PRNGKey(t.config.seed + 3), i)
      z = jax.random.normal(rng, (batch,) + t.models.sample_shape)
      c = steps.random_labels(jax.random.fold_in(rng, 1), batch, t.models.num_classes)
      z, c = jax.device_put((z, c), NamedSharding(t.mesh, P()))
      images.append(np.asarray(multihost_utils.process_allgather(gen(params, z, c), tiled=True)))
    return np.concatenate(images)[:self.num]
