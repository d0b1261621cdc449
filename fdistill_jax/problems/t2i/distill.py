r"""Stable Diffusion as an f-distill teacher: the latent denoiser and text conditioning.

The engine (`fdistill_jax.train`) distils any denoiser with EDMPrecond's call
signature `apply(variables, x, sigma, c, *, train, feature_resolutions)`. For
SD 1.x that is `LatentDenoiser`: the U-Net's eps prediction on the discrete
schedule, wrapped as D(x; sigma, c) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma), c)
(`fdistill_jax.pipelines.denoisers`), in the VAE's scaled latent space (64x64x4 for
512x512 images). The one-step generator is the same module initialised from
the teacher U-Net: x = G(sigma_max z, sigma_max, c), z ~ N(0, I), sigma_max =
14.61 (the schedule's largest sigma, t = 999), is a clean latent in one call;
the fake score starts from the teacher U-Net too.

Conditioning `c` is the CLIP text tower's last hidden state [B, 77, 768]
(`TextConditioning`, the `train.conditioning` interface); the unconditional
`c` of classifier-free guidance is the empty prompt's embedding.

Where prompts are encoded: inside the jitted steps, from token ids that the
host tokenises in the prefetch thread. The frozen text tower (123M
parameters, 85M of them in matmuls: about 13 GFLOPs per 77-token prompt) is a
few percent of one SD 1.5 U-Net forward at 64x64 latents (several hundred
GFLOPs), and an iteration runs about ten U-Net passes (forward and backward)
per example, so encoding in the step costs little and keeps data and model
independent (no re-encoding when the teacher changes): a precomputed store would
need 77 x 768 floats (236 kB in float32) per caption, 165 TB for COYO-700M,
and a new store whenever the text tower changes. Real images of the GAN's
branch are encoded the same way (VAE encoder, a posterior sample times the
scaling factor 0.18215, as DMD2's SD training does).

Everything is float32 unless `compute_dtype='bfloat16'` (networks compute in
bf16, parameters stay float32; the denoiser arithmetic is float32).
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models import sd as sd_nets
from fdistill_jax.pipelines import denoisers as denoiser
from fdistill_jax.pipelines import sd as sd_pipeline


class LatentDenoiser(nn.Module):
  """D(x; sigma, context) of a Stable Diffusion U-Net (module docstring).

  Attributes:
    unet: the UNet2DConditionModel.
    sigmas: sigma_t of the discrete schedule, t = 0 .. T-1 (increasing).
    timestep: 'interpolate' or 'nearest' (`fdistill_jax.pipelines.denoisers`).
    text_encoder, vae: the frozen CLIP text tower and VAE (teacher only; the
      generator and the fake score carry the U-Net alone).
    scaling_factor, shift_factor: VAE latent z -> U-Net latent (z - shift) * scale.
  """
  unet: sd_nets.UNet2DConditionModel
  sigmas: tuple
  timestep: str = "interpolate"
  text_encoder: Optional[nn.Module] = None
  vae: Optional[nn.Module] = None
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  def schedule(self) -> denoiser.DiscreteSchedule:
    sigmas = np.asarray(self.sigmas, np.float64)
    return denoiser.DiscreteSchedule(1.0 / (1.0 + sigmas**2))

  def __call__(self, x, sigma, context, *, train=False, feature_resolutions=None):
    """Denoised latents (float32), or (denoised, {resolution: U-Net features}).

    `context`: [B, L, C] text embeddings, or SDXL's dict (`unet_inputs`)."""
    del train                                     # SD's U-Net has no dropout here
    x = jnp.asarray(x, jnp.float32)
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    t = self.schedule().sigma_to_t(s.reshape(-1), self.timestep)
    context, extra = unet_inputs(context)
    out = self.unet(x / jnp.sqrt(1.0 + s**2), t, context,
                    feature_resolutions=feature_resolutions, **extra)
    eps, feats = out if feature_resolutions is not None else (out, None)
    denoised = x - s * jnp.asarray(eps, jnp.float32)
    return denoised if feature_resolutions is None else (denoised, feats)

  def encode_text(self, tokens):
    """Token ids [B, L] -> the text tower's last hidden state [B, L, C], float32."""
    return self.text_encoder(tokens)[0]

  def encode_images(self, images, rng):
    """Images [B, H, W, 3] in [-1, 1] -> U-Net latents: a VAE posterior sample, scaled."""
    mean, logvar = self.vae.encode(images)
    z = sd_nets.sample_latent(rng, mean, logvar)
    return sd_pipeline.to_unet_latents(z, self.scaling_factor, self.shift_factor)

  def decode(self, latents):
    """U-Net latents [B, h, w, C] -> images in about [-1, 1] [B, H, W, 3], float32."""
    return self.vae.decode(sd_pipeline.to_vae_latents(latents, self.scaling_factor,
                                                      self.shift_factor))


def unet_inputs(cond):
  """(encoder_hidden_states, U-Net keyword inputs) of a conditioning: SD's context array,
  or SDXL's pytree {'context', 'pooled', 'time_ids'} (`fdistill_jax.problems.t2i.sdxl_distill`)."""
  if isinstance(cond, Mapping):
    return cond["context"], {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
  return cond, {}


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """Text prompts as the engine's conditioning (`train.conditioning` interface).

  Batches of a text source hold 'captions' (strings; `host` tokenises them into
  'tokens' [n, L] int32) and, for image-text sources, 'images' [n, H, W, 3] in
  [-1, 1]. The generator is conditioned on the iteration's captions; the GAN's
  real branch is (VAE latents of the images, their captions).

  Attributes:
    teacher: the teacher `LatentDenoiser` (with text encoder and VAE).
    image_shape: (H, W, 3) the source's images must have (the VAE maps them to
      the teacher's latents).
    context_shape: (L, C) of the text embeddings.
    empty_tokens: token ids of the empty prompt (the unconditional input).
    tokenizer: prompts -> [N, L] int32 ids (host side).
  """
  teacher: LatentDenoiser
  image_shape: tuple
  context_shape: tuple
  empty_tokens: tuple
  tokenizer: Any = dataclasses.field(compare=False, hash=False, repr=False, default=None)

  def host(self, batch):
    batch = dict(batch)
    captions = batch.pop("captions")
    batch["tokens"] = np.asarray(self.tokenizer(list(captions)), np.int32)
    return batch

  def check_source(self, source, config):
    if not getattr(source, "has_captions", False):
      raise ValueError(f"data.kind={config.data.kind!r} yields no captions; a text-conditional "
                       "teacher needs data.kind='webdataset' (image-text shards) or 'captions'.")
    if getattr(source, "image_shape", None) is None:
      if config.loss.gan_weight > 0 or config.divergence != "rkl":
        raise ValueError(
            "The data source has captions but no images, so there is no GAN real branch and no "
            "density ratio: use it with the reverse-KL objective without GAN "
            "(--config=...:rkl,no_gan), or use an image-text source (data.kind='webdataset').")
      return
    if tuple(source.image_shape) != tuple(self.image_shape):
      raise ValueError(f"The data source yields images of shape {tuple(source.image_shape)} "
                       f"but the VAE maps {tuple(self.image_shape)} to the teacher's latents; "
                       f"set data.resolution={self.image_shape[0]}.")
    if getattr(source, "num_classes", 0):
      raise ValueError("A text-conditional teacher needs a source of captions "
                       f"(data.num_classes=0), not one with {source.num_classes} classes.")

  def draw(self, teacher_vars, key, indices, batch):
    del key, indices
    return self.teacher.apply(teacher_vars, batch["tokens"], method="encode_text")

  def real(self, teacher_vars, key, batch):
    if "images" not in batch:
      return None
    x = self.teacher.apply(teacher_vars, batch["images"], key, method="encode_images")
    return x, self.teacher.apply(teacher_vars, batch["tokens"], method="encode_text")

  def uncond(self, teacher_vars, c):
    empty = jnp.asarray(self.empty_tokens, jnp.int32)[None]
    e = self.teacher.apply(teacher_vars, empty, method="encode_text")
    return jnp.broadcast_to(e.astype(c.dtype), c.shape)

  def dummy(self, n):
    return jnp.zeros((n,) + tuple(self.context_shape), jnp.float32)


def vae_factor(vae) -> int:
  """Image pixels per latent pixel: 2^(number of VAE blocks - 1) (8 for SD)."""
  return 2 ** (len(vae.block_out_channels) - 1)


def random_params(module, seed=0):
  """Random float32 parameters for a U-Net, text tower or VAE, drawn in numpy.

  Parameter names are the reference's (`weight`, `bias`): kernels ~ N(0, 1 / fan_in),
  token and position embeddings ~ N(0, 1), norm weights (1-D `weight`) ~ 1 + N(0, 0.05^2),
  biases ~ N(0, 0.05^2); no zero or degenerate layer, so the text changes the U-Net's
  output. Tests and smoke runs only.
  """
  from fdistill_jax.loaders import diffusers as names  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    keys = [str(getattr(p, "key", p)) for p in path]
    if len(leaf.shape) >= 2 and keys[-2].endswith(("token_embedding", "position_embedding")):
      return rng.normal(size=leaf.shape)
    if len(leaf.shape) >= 2:
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return (1.0 if keys[-1] == "weight" else 0.0) + rng.normal(0, 0.05, size=leaf.shape)
  return jax.tree_util.tree_map_with_path(
      lambda p, l: jnp.asarray(draw(p, l), jnp.float32), names.param_shapes(module))
