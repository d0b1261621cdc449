"""The record every teacher loader returns, and the student architecture spec.

A teacher is a denoiser with EDMPrecond's call signature

  module.apply(variables, x, sigma, class_labels, *, train=False,
               feature_resolutions=None)  -> denoised | (denoised, features)

plus the architecture the generator and the fake score copy (the *student*)
and the parameters they start from. `spec` is a JSON description of the
student (`{'kind': 'edm', 'arch': ...}` or `{'kind': 'toy', ...}`), written
into the workdir so that a generator can be sampled and exported without the
teacher; `student_from_spec` (in `registry`) rebuilds the module from it.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fdistill_jax.loaders.errors import ConversionError  # noqa: F401  (re-exported)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher and the student architecture distilled from it.

  Attributes:
    module: the frozen teacher denoiser.
    variables: its variables (never trained, never checkpointed).
    student: the generator / fake-score architecture.
    student_params: the parameters generator and fake score start from.
    sample_shape: per-example shape of a sample, (H, W, C) or (D,).
    num_classes: label_dim (0 when unconditional).
    spec: JSON description of `student` (see the module docstring).
    identity: JSON record of which teacher this is (a file's content hash, or the
      settings a toy teacher is fitted with); a run refuses to resume with
      another one unless `teacher.allow_mismatch` is set.
    conditioning: what the networks are conditioned on (`train.conditioning`);
      None: one-hot class labels of `num_classes`.
  """
  module: nn.Module
  variables: Any
  student: nn.Module
  student_params: Any
  sample_shape: tuple
  num_classes: int
  spec: dict
  identity: dict = dataclasses.field(default_factory=dict)
  conditioning: Any = None


def check_params_only(variables, where):
  """The students carry parameters only; NCSN++'s Fourier `buffers` are not carried yet."""
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(f"{where}: the teacher has variable collections {extra} besides 'params' "
                     "(NCSN++ with Fourier embeddings); distilling such a teacher is not "
                     "supported yet. DDPM++ (SongUNet, positional) and ADM teachers are.")
