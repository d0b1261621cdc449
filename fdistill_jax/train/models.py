"""The networks of a distillation run, built from the config.

A run has four networks: the frozen teacher (never trained, never
checkpointed), the one-step generator and the fake-score network (both copies
of the teacher's architecture, initialised from its weights), and the
discriminator heads on the teacher's (or the fake score's) features. Every
denoiser, image or toy, has the EDMPrecond call signature

  module.apply(variables, x, sigma, class_labels, *, train=False,
               feature_resolutions=None)  -> denoised | (denoised, features)
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.networks import heads as heads_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
  """
  teacher: nn.Module
  student: nn.Module
  heads: heads_lib.DiscriminatorHeads
  feature_keys: tuple
  sample_shape: tuple
  num_classes: int


def _dtype(config):
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"compute_dtype={config.compute_dtype!r}; expected one of {sorted(DTYPES)}.")
  return DTYPES[config.compute_dtype]


def _load_edm_teacher(config):
  from fdistill_jax import convert  # pylint: disable=g-import-not-at-top
  module, variables = convert.load_edm(config.teacher.path, dtype=_dtype(config))
  _check_params_only(variables, config.teacher.path)
  return module, variables, module, variables["params"], _image_spec(module)


def _check_params_only(variables, where):
  """The students carry parameters only; NCSN++'s Fourier `buffers` are not carried yet."""
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(f"{where}: the teacher has variable collections {extra} besides 'params' "
                     "(NCSN++ with Fourier embeddings); distilling such a teacher is not "
                     "supported yet. DDPM++ (SongUNet, positional) and ADM teachers are.")


def _random_edm_teacher(config):
  """An EDM network with random weights (tests, benchmarks, smoke runs)."""
  from fdistill_jax import networks  # pylint: disable=g-import-not-at-top
  arch = config.teacher.arch.to_dict()
  module = networks.build_edm(arch, dtype=_dtype(config))
  variables = networks.random_variables(module, seed=config.seed + 1)
  _check_params_only(variables, "teacher.arch")
  return module, variables, module, variables["params"], _image_spec(module)


def _toy_teacher(config):
  from fdistill_jax import toy_demo  # pylint: disable=g-import-not-at-top
  return toy_demo.build_networks(config)


# kind -> loader(config) returning (teacher, teacher_variables, student,
#   student_init_params, (sample_shape, num_classes)).
TEACHERS = {"edm": _load_edm_teacher, "random": _random_edm_teacher, "toy": _toy_teacher}


def build(config):
  """Returns (models, teacher_variables, student_init_params, heads_params_shapes).

  The generator and the fake score both start from `student_init_params`.
  """
  if config.teacher.kind not in TEACHERS:
    raise ValueError(f"teacher.kind={config.teacher.kind!r}; expected one of {sorted(TEACHERS)}.")
  teacher, teacher_vars, student, student_params, (sample_shape, num_classes) = (
      TEACHERS[config.teacher.kind](config))
  keys = tuple(int(k) for k in config.disc.resolutions)
  heads = heads_lib.DiscriminatorHeads(keys=keys, channels=config.disc.channels)
  models = Models(teacher=teacher, student=student, heads=heads, feature_keys=keys,
                  sample_shape=sample_shape, num_classes=num_classes)
  return models, teacher_vars, student_params


def _image_spec(module):
  """(sample_shape, num_classes) of an EDMPrecond."""
  return ((module.img_resolution, module.img_resolution, module.img_channels),
          int(module.label_dim))


def init_heads(models, teacher_vars, rng):
  """Initialises the discriminator heads on the shapes of the teacher's features."""
  x = jnp.zeros((1,) + models.sample_shape)
  labels = jnp.zeros((1, models.num_classes)) if models.num_classes else None
  def feats():
    _, f = models.teacher.apply(teacher_vars, x, jnp.ones((1,)), labels,
                                feature_resolutions=models.feature_keys)
    return f
  shapes = jax.eval_shape(feats)
  dummy = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
  return models.heads.init(rng, dummy)["params"]


def count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def student_spec(config):
  """JSON description of the generator's architecture (for export and sampling).

  {'kind': 'edm', 'arch': EDMPrecond arguments} or {'kind': 'toy', 'width',
  'depth'}. Reads only the teacher's architecture, not its weights, where the
  teacher file allows it (a converted directory's arch.json).
  """
  kind = config.teacher.kind
  if kind == "toy":
    return {"kind": "toy", "width": int(config.toy.width), "depth": int(config.toy.depth)}
  if kind == "random":
    return {"kind": "edm", "arch": config.teacher.arch.to_dict()}
  from fdistill_jax import convert  # pylint: disable=g-import-not-at-top
  path = config.teacher.path
  arch_json = os.path.join(path, "arch.json")
  arch = convert.read_arch(arch_json) if os.path.isdir(path) else convert.read_teacher(path)[0]
  return {"kind": "edm", "arch": dict(arch)}


def student_from_spec(spec, dtype=jnp.float32):
  """(module, sample_shape, num_classes) from `student_spec`'s output."""
  if spec["kind"] == "toy":
    from fdistill_jax.networks import mlp  # pylint: disable=g-import-not-at-top
    return mlp.ToyDenoiser(width=spec["width"], depth=spec["depth"]), (2,), 0
  if spec["kind"] == "edm":
    from fdistill_jax import networks  # pylint: disable=g-import-not-at-top
    module = networks.build_edm(spec["arch"], dtype=dtype)
    return (module,) + _image_spec(module)
  raise ValueError(f"Unknown generator kind {spec['kind']!r}; expected 'edm' or 'toy'.")
