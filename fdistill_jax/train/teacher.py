"""The record every teacher loader returns, and the student architecture spec.

A teacher is a denoiser with EDMPrecond's call signature

  module.apply(variables, x, sigma, class_labels, *, train=False,
               feature_resolutions=None)  -> denoised | (denoised, features)

plus the architecture the generator and the fake score copy (the *student*)
and the parameters they start from. `spec` is a JSON description of the
student (`{'kind': 'edm', 'arch': ...}` or `{'kind': 'toy', ...}`), written
into the workdir so that a generator can be sampled and exported without the
teacher; `Registry.student_from_spec` (`train.registry`) rebuilds the module from it.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models import attention as attention_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}   # compute dtypes, by config name


def compute_dtype(config):
  """`DTYPES[config.compute_dtype]`, or a ValueError listing the choices."""
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"compute_dtype={config.compute_dtype!r}; expected one of "
                     f"{sorted(DTYPES)}.")
  return DTYPES[config.compute_dtype]


def frozen_variables(variables, config):
  """The frozen networks' variables stored in `config.frozen_dtype` (its floating leaves).

  'bfloat16' halves the teacher's (and the VAE's and text towers') memory; every
  layer casts its parameters to the compute dtype anyway, so under
  `compute_dtype='bfloat16'` only float32-computed parameters (normalisation
  scales, embeddings) round. The trainable copies (`Teacher.student_params`)
  and their optimiser moments are not touched: they stay float32.
  """
  name = config.get("frozen_dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"frozen_dtype={name!r}; expected one of {sorted(DTYPES)}.")
  dtype = DTYPES[name]
  cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return jax.tree.map(cast, variables)


def attention(config) -> str:
  """The run's attention kernel setting (config field `attention`), checked."""
  return attention_lib.check_setting(config.get("attention", "auto"))


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
