"""Stable Diffusion 1.x (teacher side) in JAX: loading, the sigma-space denoiser, sampling.

  from fdistill_jax import sd
  pipe = sd.load_pipeline("stable-diffusion-v1-5")       # networks, variables, schedule, tokenizer
  context = pipe.encode_prompts(["a photo of a cat"])    # [N, 77, 768]
  denoise = sd.cfg_denoiser(pipe.denoiser(), pipe.encode_prompts([""])[0], 7.5)
  images, prompt_index = sd.sampling.sample(pipe, ["a photo of a cat"], steps=50, cfg=7.5)

SDXL: `fdistill_jax.sd.sdxl` (loading, prompt encoding) and `sd.sdxl_distill` (teacher).
Networks: `fdistill_jax.networks.sd`. Command line: `python -m fdistill_jax.tools.sample_t2i`.
"""

from fdistill_jax.sd.denoiser import DiscreteSchedule, cfg_denoiser, eps_denoiser, unet_denoiser
from fdistill_jax.sd.pipeline import Pipeline, build_modules, load_pipeline, read_configs
from fdistill_jax.sd import sampling
