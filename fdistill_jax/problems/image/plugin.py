"""The image problem's plugin: EDM teachers ('edm', 'init', 'random') and the 'edm' student."""

from fdistill_jax.problems.image import teachers
from fdistill_jax.train import registry

PLUGIN = registry.Registry(
    teachers={"edm": teachers.teacher_from_config,
              "random": teachers.random_teacher,
              "init": teachers.initialized_teacher},
    students={"edm": teachers.student_from_spec},
)
