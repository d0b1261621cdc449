"""The text-to-image problem's plugin: SD 1.5 and SDXL teachers and students, the
text-to-image grid and FID / CLIP evaluators. Its data sources ('webdataset',
'captions') are generic (`fdistill_jax.data.webdataset`)."""

from fdistill_jax.problems.t2i import evaluator
from fdistill_jax.problems.t2i import grid
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.problems.t2i import sdxl_teacher
from fdistill_jax.problems.t2i import teachers
from fdistill_jax.train import registry

PLUGIN = registry.Registry(
    teachers={"sd15": teachers.teacher_from_config,
              "sd15_random": teachers.random_teacher,
              "sdxl": sdxl_teacher.teacher_from_config,
              "sdxl_random": sdxl_teacher.random_teacher},
    students={"sd15": teachers.student_from_spec, "sdxl": teachers.student_from_spec},
    evaluators={"t2i_grid": grid.build, "t2i": evaluator.build},
    samplers={kind: run_sampling.sample_command for kind in run_sampling.T2I_KINDS},
)
