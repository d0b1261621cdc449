"""The networks of a distillation run, as a static record the steps close over.

A run has four networks: the frozen teacher (never trained, never
checkpointed), the one-step generator and the fake-score network (both copies
of the student architecture, initialised from the teacher's weights), and the
discriminator heads on the teacher's (or the fake score's) features. The
teacher comes from the registry (`fdistill_jax.train.registry`), so this
module knows no problem by name.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models import heads as heads_lib
from fdistill_jax.train import teacher as base
from fdistill_jax.train import conditioning as conditioning_lib


@dataclasses.dataclass(frozen=True)
class Models:
  """Static description of a run's networks (hashable, closed over by the steps).

  Attributes:
    teacher: the frozen teacher denoiser.
    student: the generator / fake-score architecture.
    heads: discriminator heads.
    feature_keys: which teacher features the heads read.
    sample_shape: per-example shape of a sample, (H, W, C) or (D,).
    num_classes: label_dim (0 when unconditional).
    conditioning: what the networks are conditioned on (`train.conditioning`:
      class labels, or the teacher's own, e.g. text embeddings).
  """
  teacher: nn.Module
  student: nn.Module
  heads: heads_lib.DiscriminatorHeads
  feature_keys: tuple
  sample_shape: tuple
  num_classes: int
  conditioning: Any = None


def from_teacher(teacher: base.Teacher, disc_config, student_dropout=0.0) -> Models:
  """The run's Models: the teacher's networks plus heads at `disc.resolutions`.

  The student (generator and fake score) is the teacher's architecture with
  every dropout rate set to `student_dropout` (DMD2 and FastGen: 0); the
  teacher keeps its own.
  """
  keys = tuple(int(k) for k in disc_config.resolutions)
  heads = heads_lib.DiscriminatorHeads(keys=keys, channels=disc_config.channels,
                                       head=disc_config.head)
  conditioning = teacher.conditioning or conditioning_lib.LabelConditioning(
      int(teacher.num_classes), tuple(teacher.sample_shape))
  return Models(teacher=teacher.module, student=with_dropout(teacher.student, student_dropout),
                heads=heads, feature_keys=keys, sample_shape=tuple(teacher.sample_shape),
                num_classes=int(teacher.num_classes), conditioning=conditioning)


def with_dropout(module: nn.Module, rate: float) -> nn.Module:
  """A clone of `module` whose `dropout` fields (its own and its submodules') are `rate`.

  Label dropout is left alone; modules without a `dropout` field are returned
  unchanged.
  """
  changes = {}
  for field in dataclasses.fields(module):
    value = getattr(module, field.name, None)
    if field.name == "dropout" and isinstance(value, (int, float)):
      changes[field.name] = float(rate)
    elif isinstance(value, nn.Module):
      changes[field.name] = with_dropout(value, rate)
  return module.clone(**changes) if changes else module


def init_heads(models, teacher_vars, rng):
  """Initialises the discriminator heads on the shapes of the teacher's features."""
  x = jnp.zeros((1,) + models.sample_shape)
  labels = models.conditioning.dummy(1)
  def feats():
    _, f = models.teacher.apply(teacher_vars, x, jnp.ones((1,)), labels,
                                feature_resolutions=models.feature_keys)
    return f
  try:
    shapes = jax.eval_shape(feats)
  except ValueError as e:        # the teacher has no features at some of the keys
    raise ValueError(
        f"disc.resolutions={models.feature_keys}: {e} Change --config.disc.resolutions to "
        "those, or --config.data.resolution (the features lie at the input resolution divided "
        "by the U-Net's downsampling, and by the VAE's for a latent teacher).") from None
  dummy = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
  return models.heads.init(rng, dummy)["params"]
