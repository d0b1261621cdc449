"""Stable Diffusion networks in Flax: U-Net, CLIP text and vision towers, VAE.

Parameter trees mirror the diffusers / transformers state dicts (list indices
joined with underscores); `fdistill_jax.loaders` and `fdistill_jax.pipelines` load model folders and
checkpoints into them and wraps the U-Net as an EDM-style denoiser.
"""

from fdistill_jax.models.sd.clip import CLIPTextModel
from fdistill_jax.models.sd.clip import CLIPTextModelWithProjection
from fdistill_jax.models.sd.clip import CLIPTextTransformer
from fdistill_jax.models.sd.clip import CLIPVisionModelWithProjection
from fdistill_jax.models.sd.clip import CLIPVisionTransformer
from fdistill_jax.models.sd.unet import UNet2DConditionModel
from fdistill_jax.models.sd.unet import timestep_embedding
from fdistill_jax.models.sd.vae import AutoencoderKL
from fdistill_jax.models.sd.vae import sample_latent
