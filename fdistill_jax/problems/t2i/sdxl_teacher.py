"""SDXL teachers of the registry: `teacher.kind='sdxl'` and `'sdxl_random'`.

  sdxl         a diffusers SDXL folder at `teacher.path` (unet/, text_encoder/,
               text_encoder_2/, tokenizer/, tokenizer_2/, vae/, scheduler/),
               read by `fdistill_jax.pipelines.sd.load_pipeline` (nothing executed).
  sdxl_random  the architecture of `teacher.arch` ({'unet', 'text_encoder',
               'text_encoder_2', 'vae'}: config.json dicts) with random weights
               and SD's scheduler; tokenizers from `teacher.tokenizer` and
               `teacher.tokenizer_2`. For tests and smoke runs.

Both are SD 1.5's teacher functions (`teachers`) with kind 'sdxl': the teacher is
the pipeline's `LatentDenoiser` (U-Net, both text towers, VAE), generator and fake
score the U-Net alone (generator spec kind 'sdxl'), conditioned on the pytree
{'context', 'pooled', 'time_ids'} of `distill.TextConditioning`.
"""

from fdistill_jax.problems.t2i import teachers
from fdistill_jax.train import teacher as base

PARTS = teachers.PARTS["sdxl"]


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='sdxl'`: SDXL from a diffusers folder."""
  return teachers.folder_teacher(config, "sdxl")


def random_teacher(config) -> base.Teacher:
  """`teacher.kind='sdxl_random'`: `teacher.arch`'s SDXL networks with random weights."""
  return teachers.random_pipeline_teacher(config, "sdxl")
