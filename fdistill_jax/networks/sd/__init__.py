"""Stable Diffusion networks in Flax: U-Net, CLIP text and vision towers, VAE.

Parameter trees mirror the diffusers / transformers state dicts (list indices
joined with underscores); `fdistill_jax.sd` loads model folders and
checkpoints into them and wraps the U-Net as an EDM-style denoiser.
"""

from fdistill_jax.networks.sd.clip import (
    CLIPTextModel, CLIPTextModelWithProjection, CLIPTextTransformer, CLIPVisionModelWithProjection,
    CLIPVisionTransformer, clip_pixels)
from fdistill_jax.networks.sd.unet import UNet2DConditionModel, timestep_embedding
from fdistill_jax.networks.sd.vae import AutoencoderKL, sample_latent
