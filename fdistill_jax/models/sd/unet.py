"""Stable Diffusion's UNet2DConditionModel (diffusers 0.42), Flax linen, NHWC.

Module for module as diffusers `models/unets/unet_2d_condition.py` builds it
for the SD 1.x / 2.x layout: `conv_in`, `time_proj` (sinusoidal, no
parameters), `time_embedding` (`linear_1`, SiLU, `linear_2`), `down_blocks_i`
(CrossAttnDownBlock2D or DownBlock2D: `resnets_j`, `attentions_j`,
`downsamplers_0`), `mid_block` (UNetMidBlock2DCrossAttn), `up_blocks_i`
(CrossAttnUpBlock2D or UpBlock2D, each consuming `layers_per_block + 1` skips),
`conv_norm_out`, `conv_out`. Parameter names are diffusers' state-dict names
with list indices joined by underscores (see `fdistill_jax.loaders.diffusers`).

`num_attention_heads[i]` is the head count of block i (SD 1.5's config calls it
`attention_head_dim`, a historical misnomer that diffusers keeps); the head
width is `block_out_channels[i] // heads`.

SDXL's additions (diffusers' `addition_embed_type="text_time"`): the pooled
text embedding `text_embeds` [B, P] and the six size/crop numbers `time_ids`
[B, 6] (original height, width, crop top, left, target height, width), each
number through the sinusoidal `add_time_proj` of width
`addition_time_embed_dim`, concatenated after `text_embeds`
(`projection_class_embeddings_input_dim` = P + 6 * that width), then
`add_embedding` (a TimestepEmbedding) added to the time embedding.
`transformer_layers_per_block` may be one integer or one per block (the mid
block takes the last, up blocks the reversed list), as in SDXL's [1, 2, 10].

Features for discriminator heads: `feature_resolutions=(32, 16, MID)` also
returns `{key: tensor}`. A key r > 0 is the encoder's last skip activation
whose height is r (the output of the last resnet/attention pair of the down
block at that resolution, before its downsampler; for square latents r is the
resolution: 64, 32, 16, 8 for 64x64 latents), as `feature_resolutions` of
`networks.unets` gives for EDM. The key `MID` (= 0, the bottleneck) is the mid
block's output. Keys are integers so that the dict stays a sortable pytree.
NHWC, in the compute dtype.
"""

import dataclasses
import math
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models.sd.blocks import Downsample2D
from fdistill_jax.models.sd.blocks import Transformer2DModel
from fdistill_jax.models.sd.blocks import Upsample2D
from fdistill_jax.models.sd.blocks import resnet
from fdistill_jax.models.sd.layers import Conv
from fdistill_jax.models.sd.layers import GroupNorm
from fdistill_jax.models.sd.layers import Linear

MID = 0  # feature_resolutions key of the mid block's output.
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
  """diffusers `get_timestep_embedding`: [sin(t w), cos(t w)], w_i = P^(-i / (dim/2 - shift)).

  `flip_sin_to_cos` puts cos first (SD). Fractional t is allowed. float32 [B, dim].
  """
  half = dim // 2
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - freq_shift)
  freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """`linear_1` -> SiLU -> `linear_2`."""
  features: int

  @nn.compact
  def __call__(self, x):
    return Linear(self.features, name="linear_2")(nn.silu(Linear(self.features, name="linear_1")(x)))


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """Settings shared by every block of one U-Net."""
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  transformer_depth: int = 1
  use_linear_projection: bool = False
  remat: bool = False
  attention: str = "xla"

  def transformer(self, channels, heads, name):
    return Transformer2DModel(heads, channels // heads, self.transformer_depth, self.groups,
                              self.use_linear_projection, self.remat, self.attention, name=name)

  def resnet(self, channels, name):
    return resnet(self.remat)(channels, self.groups, self.eps, self.output_scale_factor, name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (`attention=True`) or DownBlock2D; returns (x, skips)."""
  channels: int
  layers: int
  heads: int
  attention: bool
  downsample: bool
  padding: int
  opt: BlockOptions

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for j in range(self.layers):
      x = self.opt.resnet(self.channels, f"resnets_{j}")(x, temb)
      if self.attention:
        x = self.opt.transformer(self.channels, self.heads, f"attentions_{j}")(x, context)
      skips.append(x)
    if self.downsample:
      x = Downsample2D(self.channels, self.padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D or UpBlock2D: concatenates one skip before each resnet."""
  channels: int
  layers: int
  heads: int
  attention: bool
  opt: BlockOptions

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    skips = list(skips)
    for j in range(self.layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.opt.resnet(self.channels, f"resnets_{j}")(x, temb)
      if self.attention:
        x = self.opt.transformer(self.channels, self.heads, f"attentions_{j}")(x, context)
    if upsample_size is not None:
      x = Upsample2D(self.channels, name="upsamplers_0")(x, upsample_size)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnets_0, attentions_0, resnets_1 (output * 1 / scale)."""
  heads: int
  opt: BlockOptions

  @nn.compact
  def __call__(self, x, temb, context):
    c = x.shape[-1]
    x = self.opt.resnet(c, "resnets_0")(x, temb)
    x = self.opt.transformer(c, self.heads, "attentions_0")(x, context)
    return self.opt.resnet(c, "resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
  """eps(x_t, t, context) of Stable Diffusion. Build it from a config with
  `fdistill_jax.loaders.sd_configs.unet_from_config`.

  Attributes mirror diffusers' config keys (resolved: `num_attention_heads` is
  per block). `dtype` is the compute dtype (parameters stay float32; the time
  embedding is float32); `remat` wraps every resnet and transformer block in
  `nn.remat`; `attention` picks the attention kernel
  (`fdistill_jax.models.attention.SETTINGS`).
  """
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  num_attention_heads: Sequence[int] = (8, 8, 8, 8)
  cross_attention_dim: int = 768
  transformer_layers_per_block: Union[int, Sequence[int]] = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  resnet_out_scale_factor: float = 1.0
  center_input_sample: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  time_embedding_dim: Optional[int] = None
  addition_embed_type: Optional[str] = None  # None or "text_time" (SDXL)
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str = "xla"

  def transformer_depths(self):
    """Transformer layers of each block (down order): `transformer_layers_per_block` per block."""
    depth, n = self.transformer_layers_per_block, len(self.block_out_channels)
    return (depth,) * n if isinstance(depth, int) else tuple(depth)

  def options(self, output_scale_factor=None, depth=None):
    return BlockOptions(self.norm_num_groups, self.norm_eps,
                        output_scale_factor or self.resnet_out_scale_factor,
                        self.transformer_depths()[-1] if depth is None else depth, self.use_linear_projection,
                        self.remat, self.attention)

  def _embed(self, timesteps, batch, text_embeds, time_ids):
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
    dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
    temb = TimestepEmbedding(dim, name="time_embedding")(emb)
    if self.addition_embed_type is None:
      return temb
    return temb + self._text_time_embedding(dim, batch, text_embeds, time_ids)

  def _text_time_embedding(self, dim, batch, text_embeds, time_ids):
    """SDXL's `add_embedding([text_embeds, add_time_proj(time_ids)])` (module docstring)."""
    if text_embeds is None or time_ids is None:
      raise ValueError("this U-Net has addition_embed_type='text_time' (SDXL): pass text_embeds "
                       "(the pooled text embedding) and time_ids (original size, crop "
                       "top-left, target size) as keyword arguments.")
    text_embeds = jnp.asarray(text_embeds, jnp.float32)
    time_ids = jnp.asarray(time_ids, jnp.float32)
    width = self.projection_class_embeddings_input_dim
    if text_embeds.shape[0] != batch or time_ids.shape[0] != batch or (
        text_embeds.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim != width):
      raise ValueError(
          f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} do not fit this U-Net: "
          f"it takes batch {batch} and text_embeds width + {self.addition_time_embed_dim} x "
          f"time_ids width = projection_class_embeddings_input_dim = {width}.")
    proj = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                              self.flip_sin_to_cos, self.freq_shift).reshape(batch, -1)
    add = jnp.concatenate([text_embeds, proj], axis=-1)
    return TimestepEmbedding(dim, name="add_embedding")(add)

  def _down(self, x, temb, context, features):
    skips, n, depths = [x], len(self.block_out_channels), self.transformer_depths()
    for i, kind in enumerate(self.down_block_types):
      x, new = DownBlock(self.block_out_channels[i], self.layers_per_block,
                         self.num_attention_heads[i], kind == "CrossAttnDownBlock2D",
                         i < n - 1, self.downsample_padding, self.options(depth=depths[i]),
                         name=f"down_blocks_{i}")(x, temb, context)
      features[new[self.layers_per_block - 1].shape[1]] = new[self.layers_per_block - 1]
      skips.extend(new)
    return x, skips

  def _up(self, x, skips, temb, context):
    n, k = len(self.block_out_channels), self.layers_per_block + 1
    channels = tuple(reversed(self.block_out_channels))
    heads = tuple(reversed(self.num_attention_heads))
    depths = tuple(reversed(self.transformer_depths()))
    for i, kind in enumerate(self.up_block_types):
      mine, skips = skips[-k:], skips[:-k]
      size = skips[-1].shape[1:3] if i < n - 1 else None
      x = UpBlock(channels[i], k, heads[i], kind == "CrossAttnUpBlock2D",
                  self.options(depth=depths[i]), name=f"up_blocks_{i}")(x, mine, temb, context, size)
    return x

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, *, feature_resolutions=None,
               text_embeds=None, time_ids=None):
    """Predicts the noise eps.

    Args:
      sample: [B, H, W, C] latents (NHWC), any float dtype.
      timesteps: [B] or scalar; fractional timesteps are allowed.
      encoder_hidden_states: [B, L, cross_attention_dim] text embeddings.
      text_embeds, time_ids: SDXL only ("text_time"): pooled text [B, P] and
        size/crop conditioning [B, 6] (module docstring).
      feature_resolutions: optional heights and/or MID (module docstring).

    Returns:
      float32 eps [B, H, W, out_channels], or `(eps, {key: features})`.
    """
    x = jnp.asarray(sample).astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    temb = self._embed(timesteps, x.shape[0], text_embeds, time_ids)
    x = Conv(self.block_out_channels[0], self.conv_in_kernel, name="conv_in")(x)
    features = {}
    x, skips = self._down(x, temb, context, features)
    mid_opt = self.options(output_scale_factor=self.mid_block_scale_factor)
    x = features[MID] = MidBlock(self.num_attention_heads[-1], mid_opt, name="mid_block")(
        x, temb, context)
    x = self._up(x, skips, temb, context)
    x = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out")(x))
    out = Conv(self.out_channels, self.conv_out_kernel, name="conv_out")(x).astype(jnp.float32)
    if feature_resolutions is None:
      return out
    return out, _select_features(features, feature_resolutions)


def _select_features(features, keys):
  missing = [k for k in keys if k not in features]
  if missing:
    raise ValueError(f"feature_resolutions {tuple(keys)} includes {missing}, but this U-Net "
                     f"offers {sorted(features)} for these latents (heights of the down blocks' "
                     "last skips, and MID = 0 for the mid block); request a subset of those.")
  return {k: features[k] for k in keys}
