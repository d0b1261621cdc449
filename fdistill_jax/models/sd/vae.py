"""Stable Diffusion's AutoencoderKL (diffusers 0.42 `models/autoencoders/`), Flax linen, NHWC.

`encoder` (`conv_in`, `down_blocks_i` = DownEncoderBlock2D with `resnets_j`
and `downsamplers_0`, `mid_block`, `conv_norm_out`, `conv_out` to 2 x latent
channels), `quant_conv`, `post_quant_conv`, `decoder` (`conv_in`, `mid_block`,
`up_blocks_i` = UpDecoderBlock2D with `layers_per_block + 1` resnets and
`upsamplers_0`, `conv_norm_out`, `conv_out`). All norms have eps 1e-6; the mid
block's single-head attention has `group_norm`, `to_q`, `to_k`, `to_v`,
`to_out_0`, all with biases, and a residual connection.

Latent scaling is the caller's: Stable Diffusion's U-Net sees
`scaling_factor * (z - shift_factor)` (SD 1.5: 0.18215, no shift); see
`fdistill_jax.pipelines.sd`.

  vae.apply(variables, images, method="encode")   # -> (mean, logvar) of q(z | x)
  vae.apply(variables, z, method="decode")        # -> images in about [-1, 1]
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models.sd.blocks import Downsample2D
from fdistill_jax.models.sd.blocks import Upsample2D
from fdistill_jax.models.sd.blocks import resnet
from fdistill_jax.models.sd.layers import Conv
from fdistill_jax.models.sd.layers import GroupNorm
from fdistill_jax.models.sd.layers import Linear
from fdistill_jax.models.sd.layers import attention

EPS = 1e-6


class VAEAttention(nn.Module):
  """Single-head self-attention over all pixels with a residual connection."""
  groups: int = 32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, EPS, name="group_norm")(x).reshape(b, h * w, c)
    q, k, v = (Linear(c, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = Linear(c, name="to_out_0")(attention(q, k, v, heads=1, implementation=self.attention))
    return y.reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
  """UNetMidBlock2D without time embedding: resnets_0, attentions_0, resnets_1."""
  groups: int = 32
  add_attention: bool = True
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = resnet(self.remat)(c, self.groups, EPS, name="resnets_0")(x)
    if self.add_attention:
      x = VAEAttention(self.groups, self.attention, name="attentions_0")(x)
    return resnet(self.remat)(c, self.groups, EPS, name="resnets_1")(x)


class ResnetStack(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: `layers` resnets, then an optional resampler."""
  channels: int
  layers: int
  resample: str = ""  # "", "down" or "up"
  groups: int = 32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = resnet(self.remat)(self.channels, self.groups, EPS, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample2D(self.channels, padding=0, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample2D(self.channels, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int = 32
  mid_block_add_attention: bool = True
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    n = len(self.block_out_channels)
    x = Conv(self.block_out_channels[0], 3, name="conv_in")(x)
    for i, c in enumerate(self.block_out_channels):
      x = ResnetStack(c, self.layers_per_block, "down" if i < n - 1 else "", self.groups,
                      self.remat, name=f"down_blocks_{i}")(x)
    x = VAEMidBlock(self.groups, self.mid_block_add_attention, self.remat, self.attention,
                    name="mid_block")(x)
    x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out")(x))
    return Conv(2 * self.latent_channels, 3, name="conv_out")(x)


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int = 32
  mid_block_add_attention: bool = True
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, z):
    channels = tuple(reversed(self.block_out_channels))
    x = Conv(channels[0], 3, name="conv_in")(z)
    x = VAEMidBlock(self.groups, self.mid_block_add_attention, self.remat, self.attention,
                    name="mid_block")(x)
    for i, c in enumerate(channels):
      x = ResnetStack(c, self.layers_per_block + 1, "up" if i < len(channels) - 1 else "",
                      self.groups, self.remat, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out")(x))
    return Conv(self.out_channels, 3, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder; build it from a config with `fdistill_jax.loaders.sd_configs.vae_from_config`.

  `dtype` is the compute dtype (parameters float32); outputs are float32.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str = "xla"

  def setup(self):
    common = dict(groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  remat=self.remat, attention=self.attention)
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                           **common)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.out_channels,
                           **common)
    if self.use_quant_conv:
      self.quant_conv = Conv(2 * self.latent_channels, 1)
    if self.use_post_quant_conv:
      self.post_quant_conv = Conv(self.latent_channels, 1)

  def encode(self, images):
    """Images [B, H, W, in_channels] -> (mean, logvar) of q(z | x), float32; logvar in [-30, 20]."""
    moments = self.encoder(jnp.asarray(images).astype(self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Latents [B, h, w, latent_channels] (unscaled) -> images, float32."""
    z = jnp.asarray(z).astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    """decode(mean of encode(images)): touches every parameter (for init)."""
    return self.decode(self.encode(images)[0])


def sample_latent(rng, mean, logvar):
  """z = mean + exp(logvar / 2) * N(0, I), diffusers' `DiagonalGaussianDistribution.sample`."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
