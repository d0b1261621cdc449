"""The image problem's teachers and student: EDM networks as `Teacher` records.

Teacher kinds: 'edm' (a snapshot, state dict, converted directory or the
workdir of a method='edm' run, read by `fdistill_jax.loaders.edm`), 'init'
(EDM's own initialisation of `teacher.arch`) and 'random' (random weights, for
tests and benchmarks). Student kind 'edm': the generator spec's `arch`.
"""

import pathlib

import jax
import jax.numpy as jnp

from fdistill_jax.loaders import edm
from fdistill_jax.loaders.edm_variables import declared_param_count
from fdistill_jax.loaders.edm_variables import random_variables
from fdistill_jax.models.edm import build_edm
from fdistill_jax.train import teacher as base


def _image_teacher(module, variables, where, arch, identity) -> base.Teacher:
  base.check_params_only(variables, where)
  return base.Teacher(
      module=module, variables=variables, student=module, student_params=variables["params"],
      sample_shape=(module.img_resolution, module.img_resolution, module.img_channels),
      num_classes=int(module.label_dim), spec={"kind": "edm", "arch": dict(arch)},
      identity=identity)


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='edm'`: an EDM snapshot, state dict, converted directory, or the
  workdir of a teacher trained with method='edm'."""
  path = config.teacher.path
  if not path:
    raise ValueError("teacher.kind='edm' needs --config.teacher.path: an EDM snapshot "
                     "(.pkl), a directory written by python -m fdistill_jax.tools.convert, or "
                     "the workdir of a method='edm' run.")
  if pathlib.Path(path).is_dir():
    path = edm.resolve_converted(path)            # a method='edm' workdir: its teacher/
    module, variables = edm.load_converted(path, base.compute_dtype(config),
                                           base.attention(config))
    arch = edm.read_arch(path / edm.ARCH_FILE)
  else:
    arch, state_dict = edm.read_teacher(path)
    variables = edm.teacher_variables(arch, state_dict, path)
    module = build_edm(arch, base.compute_dtype(config), base.attention(config))
  return _image_teacher(module, variables, path, arch, edm.teacher_identity(path))


def initialized_teacher(config) -> base.Teacher:
  """`teacher.kind='init'`: EDM's own initialisation of `teacher.arch` (`module.init`:
  Xavier-uniform layers, near-zero last layers), the start of a method='edm' run."""
  arch = config.teacher.arch.to_dict()
  module = build_edm(arch, dtype=base.compute_dtype(config), attention=base.attention(config))
  r, c = module.img_resolution, module.img_channels
  labels = jnp.zeros((1, module.label_dim)) if module.label_dim else None
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, r, r, c)), jnp.ones((1,)), labels))
  variables = jax.device_get(init(jax.random.PRNGKey(config.seed + 1)))
  return _image_teacher(module, variables, "teacher.arch", arch,
                        {"kind": "init", "arch": arch, "seed": config.seed + 1})


def random_teacher(config) -> base.Teacher:
  """`teacher.kind='random'`: an EDM network with random weights (tests, benchmarks)."""
  arch = config.teacher.arch.to_dict()
  module = build_edm(arch, dtype=base.compute_dtype(config), attention=base.attention(config))
  variables = random_variables(module, seed=config.seed + 1)
  return _image_teacher(module, variables, "teacher.arch", arch,
                        {"kind": "random", "arch": arch, "seed": config.seed + 1})


def student_from_spec(spec, dtype=jnp.float32):
  """The generator of an EDM spec; its arch (from a workdir or export file) is checked first."""
  arch = spec.get("arch")
  if not isinstance(arch, dict):
    raise ValueError("The generator spec has no 'arch' object (EDMPrecond arguments).")
  declared_param_count(arch)
  module = build_edm(arch, dtype=dtype)
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  return module, shape, int(module.label_dim)
