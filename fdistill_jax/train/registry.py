"""The teacher registry: `config.teacher.kind` -> loader, and spec -> student module."""

from typing import Callable

import jax.numpy as jnp

from fdistill_jax.models.edm import build_edm
from fdistill_jax.loaders.edm_variables import declared_param_count
from fdistill_jax.train import teacher as base
from fdistill_jax.loaders import edm
from fdistill_jax.problems.t2i import teachers as sd
from fdistill_jax.problems.t2i import sdxl_teacher as sdxl
from fdistill_jax.problems.toy import problem as toy_problem

# kind -> loader(config) -> base.Teacher
TEACHERS: dict[str, Callable[..., base.Teacher]] = {
    "edm": edm.teacher_from_config,
    "random": edm.random_teacher,
    "init": edm.initialized_teacher,
    "toy": toy_problem.teacher_from_config,
    "sd15": sd.teacher_from_config,
    "sd15_random": sd.random_teacher,
    "sdxl": sdxl.teacher_from_config,
    "sdxl_random": sdxl.random_teacher,
}


def build(config) -> base.Teacher:
  """The teacher `config.teacher.kind` names."""
  kind = config.teacher.kind
  if kind not in TEACHERS:
    raise ValueError(f"teacher.kind={kind!r}; expected one of {sorted(TEACHERS)}.")
  return TEACHERS[kind](config)


def _edm_student(spec, dtype):
  """The generator of an EDM spec; its arch (from a workdir or export file) is checked first."""
  arch = spec.get("arch")
  if not isinstance(arch, dict):
    raise ValueError("The generator spec has no 'arch' object (EDMPrecond arguments).")
  declared_param_count(arch)
  module = build_edm(arch, dtype=dtype)
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  return module, shape, int(module.label_dim)


# spec['kind'] -> builder(spec, dtype) -> (module, sample_shape, num_classes)
STUDENTS = {"edm": _edm_student, "toy": toy_problem.student_from_spec,
            "sd15": sd.student_from_spec, "sdxl": sd.student_from_spec}


def student_from_spec(spec, dtype=jnp.float32):
  """(module, sample_shape, num_classes) of the generator a spec describes."""
  kind = spec.get("kind") if isinstance(spec, dict) else None
  if kind not in STUDENTS:
    raise ValueError(f"Unknown generator kind {kind!r} in the generator spec; expected one "
                     f"of {sorted(STUDENTS)}.")
  return STUDENTS[kind](spec, dtype)
