r"""Sampling, in one place: one-step generation, per-sample noise and labels, batching.

The distilled generator makes a sample in one network evaluation (paper
Sec. 3, Algorithm 1): x = G_theta(sigma_init * z, sigma_init, c), z ~ N(0, I)
(`generate`). The training steps, the sample grids, FID, the toy report and
the `sample` command all call it.

Per-sample randomness: sample i under base key k uses key_i = fold_in(k, i),
noise z_i = normal(fold_in(key_i, 0), sample_shape) and label
c_i = randint(fold_in(key_i, 1), 0, num_classes) (or classes[i % len] for a
fixed list); the teacher's stochastic sampler draws from fold_in(key_i, 2).
A sample therefore depends only on (k, i), never on the batch size or the
device count, and a batch's indices can be sharded like the batch itself.
Unconditional models get label -1 (`sample_labels`) and no one-hot (`one_hot`).
"""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fdistill_jax import console
from fdistill_jax.pipelines import edm_sampler
from fdistill_jax.pipelines import sharded

NOISE, LABEL, CHURN = 0, 1, 2      # fold_in tags of a sample's key


class SampleError(ValueError):
  """A sampling option is unusable."""


def sample_keys(key, indices):
  """key_i = fold_in(key, i) for each global sample index i: [len(indices)] keys."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def sample_noise(key, indices, shape, dtype=jnp.float32):
  """z_i = normal(fold_in(key_i, 0), shape), stacked: [len(indices), *shape]."""
  keys = sample_keys(key, indices)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, NOISE), shape, dtype))(keys)


def sample_labels(key, indices, num_classes, classes: Optional[Sequence[int]] = None):
  """Integer labels [len(indices)]: uniform, classes[i % len], or -1 if unconditional."""
  if not num_classes:
    return jnp.full(indices.shape, -1, jnp.int32)
  if classes is not None:
    return jnp.asarray(classes, jnp.int32)[indices % len(classes)]
  keys = sample_keys(key, indices)
  draw = lambda k: jax.random.randint(jax.random.fold_in(k, LABEL), (), 0, num_classes)
  return jax.vmap(draw)(keys).astype(jnp.int32)


def one_hot(labels, num_classes):
  """One-hot float labels [B, num_classes], or None for an unconditional model."""
  return jax.nn.one_hot(labels, num_classes) if num_classes else None


def generate(student, params, noise, labels, sigma_init):
  """One-step generation x = G(sigma_init * z, sigma_init, c); `labels` one-hot or None."""
  sigma = jnp.full((noise.shape[0],), sigma_init, noise.dtype)
  return student.apply({"params": params}, sigma_init * noise, sigma, labels)


def generator_batch_fn(module, sample_shape, num_classes, sigma_init, classes=None):
  """fn(params, key, indices) -> (x, int labels): one-step samples of these indices."""
  def fn(params, key, indices):
    z = sample_noise(key, indices, tuple(sample_shape))
    labels = sample_labels(key, indices, num_classes, classes)
    return generate(module, params, z, one_hot(labels, num_classes), sigma_init), labels
  return fn


def teacher_batch_fn(module, sampler_kwargs, classes=None):
  """fn(variables, key, indices) -> (x, labels) with EDM's Heun sampler, per-sample keys."""
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  num_classes = int(module.label_dim)
  def fn(variables, key, indices):
    z = sample_noise(key, indices, shape)
    labels = sample_labels(key, indices, num_classes, classes)
    churn = jax.vmap(lambda k: jax.random.fold_in(k, CHURN))(sample_keys(key, indices))
    denoise = lambda x, s, y: module.apply(variables, x, s, y)
    def one(k, z_i, y_i):
      y = None if y_i is None else y_i[None]
      return edm_sampler.edm_sampler(denoise, k, (1,) + shape, class_labels=y,
                                     latents=z_i[None], **sampler_kwargs)[0]
    return jax.vmap(one)(churn, z, one_hot(labels, num_classes)), labels
  return fn


@dataclasses.dataclass(frozen=True)
class ModelSampler:
  """One way a run's network makes samples, for evaluators.

  Attributes:
    name: what a table row calls it, e.g. 'one-step generator', 'Heun, 18 steps'.
    calls: network evaluations per sample (1 for a one-step generator; EDM's
      Heun sampler with N steps: 2N - 1).
    params_key: the entry of the evaluators' `params` dict it samples with.
    batch_fn: fn(params, key, indices) -> (x, int labels), as `generator_batch_fn`
      returns (labels uniform over the classes unless built with `classes`).
    make: classes -> a batch_fn drawing classes[i % len] (fixed labels, e.g. grids).
  """
  name: str
  calls: int
  params_key: str
  batch_fn: Callable
  make: Callable


def one_step_model_sampler(module, sample_shape, num_classes, sigma_init, params_key,
                           name="one-step generator"):
  """x = G(sigma_init z, sigma_init, c) with the params under `params_key` (1 call)."""
  make = lambda classes=None: generator_batch_fn(module, sample_shape, num_classes, sigma_init,
                                                 classes)
  return ModelSampler(name, 1, params_key, make(), make)


def heun_model_sampler(module, sampler_kwargs, params_key, name=None):
  """EDM's Heun sampler on the denoiser whose params are under `params_key` (2N - 1 calls)."""
  steps = int(sampler_kwargs.get("num_steps", 18))
  def make(classes=None):
    fn = teacher_batch_fn(module, sampler_kwargs, classes)
    return lambda params, key, indices: fn({"params": params}, key, indices)
  return ModelSampler(name or f"Heun, {steps} steps", 2 * steps - 1, params_key, make(), make)


class BatchSampler:
  """Runs batch_fn(variables, key, indices) over indices 0..num-1, compiled once.

  The batch axis is sharded over a 1-D ('data',) mesh of `devices` (default:
  all devices of all processes; `sharded.ShardedFn`); the batch is rounded up
  to a multiple of the device count and the last one is padded (extra samples
  are dropped). The
  next batch is dispatched before the current one is fetched. Every process
  must call it (the results are gathered to all of them). The same compiled
  program serves every call with variables of the same shapes, so periodic
  evaluation does not recompile.
  """

  def __init__(self, batch_fn: Callable, batch=256, devices=None):
    if batch <= 0:
      raise SampleError(f"batch={batch} must be positive.")
    devices = tuple(jax.devices() if devices is None else devices)
    self.batch = size = sharded.round_up(batch, len(devices))
    def run(variables, key, start):
      indices = start + jnp.arange(size, dtype=jnp.int32)
      return batch_fn(variables, key, jax.lax.with_sharding_constraint(indices, self._fn.data))
    self._fn = sharded.ShardedFn(run, 0, devices, replicated_args=3)

  def _fetch(self, x):
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def __call__(self, variables, num, *, seed=0, postprocess=None, what="sampling"):
    """Numpy (x, labels) of samples 0..num-1 under PRNGKey(seed)."""
    if num <= 0:
      raise SampleError(f"num={num}; the number of samples must be positive.")
    variables = self._fn.replicate(variables)
    key = self._fn.replicate(jax.random.PRNGKey(seed))
    xs, labels, progress = [], [], console.Counter(what, num)
    starts = list(range(0, num, self.batch))
    pending = self._fn(variables, key, jnp.int32(0))
    for i, start in enumerate(starts):
      x, y = pending
      if i + 1 < len(starts):
        pending = self._fn(variables, key, jnp.int32(starts[i + 1]))
      n = min(self.batch, num - start)
      x = self._fetch(x)[:n]
      xs.append(postprocess(x) if postprocess else x)
      labels.append(self._fetch(y)[:n])
      progress(start + n)
    return np.concatenate(xs), np.concatenate(labels)


def sample_all(batch_fn: Callable, variables, num, *, seed=0, batch=256, devices=None,
               postprocess=None, what="sampling"):
  """One-off `BatchSampler` run (the batch is at most `num`)."""
  if num <= 0 or batch <= 0:
    raise SampleError(f"num={num}, batch={batch}: both must be positive.")
  sampler = BatchSampler(batch_fn, max(1, min(batch, num)), devices)
  return sampler(variables, num, seed=seed, postprocess=postprocess, what=what)


def generate_samples(module, params, num, *, sample_shape, num_classes, sigma_init,
                     seed=0, batch=256, classes=None, devices=None, postprocess=None):
  """One-step generator samples (float [N, *shape], or postprocessed) and int labels [N]."""
  fn = generator_batch_fn(module, sample_shape, num_classes, sigma_init, classes)
  return sample_all(fn, params, num, seed=seed, batch=batch, devices=devices,
                    postprocess=postprocess, what="one-step samples")


def sampler_settings(preset="cifar10", num_steps=None):
  """EDM Heun sampler keyword arguments: a preset, optionally with num_steps replaced."""
  if preset not in edm_sampler.EDM_SAMPLER_PRESETS:
    raise SampleError(f"teacher_preset={preset!r}; expected one of "
                      f"{sorted(edm_sampler.EDM_SAMPLER_PRESETS)}.")
  kwargs = dict(edm_sampler.EDM_SAMPLER_PRESETS[preset])
  if num_steps is not None:
    if num_steps < 2:
      raise SampleError(f"num_steps={num_steps}; EDM's Heun sampler needs at least 2.")
    kwargs["num_steps"] = int(num_steps)
  return kwargs


def teacher_samples(module, variables, num, *, sampler_kwargs, seed=0, batch=256,
                    classes=None, devices=None, postprocess=None):
  """EDM teacher samples with the Heun sampler (Karras et al. 2022, Algorithm 2)."""
  fn = teacher_batch_fn(module, sampler_kwargs, classes)
  return sample_all(fn, variables, num, seed=seed, batch=batch, devices=devices,
                    postprocess=postprocess, what="teacher samples")


def parse_labels(spec, num_classes):
  """'uniform' -> None; '3' or '0,3,7' -> tuple of classes, checked against num_classes."""
  if spec in (None, "", "uniform"):
    return None
  try:
    classes = tuple(int(t) for t in str(spec).split(","))
  except ValueError as e:
    raise SampleError(f"--labels={spec!r}; expected 'uniform', a class index or a "
                      "comma-separated list of class indices such as '0,3,7'.") from e
  if not num_classes:
    raise SampleError(f"--labels={spec!r} but the model is unconditional (no classes); "
                      "omit --labels.")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise SampleError(f"--labels has class(es) {bad} outside [0, {num_classes - 1}]: the "
                      f"model has {num_classes} classes.")
  return classes
