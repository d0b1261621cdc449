"""diffusers' building blocks: ResnetBlock2D, down/up-samplers, Transformer2DModel.

Each module mirrors its diffusers 0.42 counterpart (`models/resnet.py`,
`models/downsampling.py`, `models/upsampling.py`,
`models/transformers/transformer_2d.py`, `models/attention.py`) with the same
submodule names, so `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`
is Flax's `down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/weight`
(a list index joins its list's name with an underscore).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models.sd.layers import Attention
from fdistill_jax.models.sd.layers import Conv
from fdistill_jax.models.sd.layers import GroupNorm
from fdistill_jax.models.sd.layers import LayerNorm
from fdistill_jax.models.sd.layers import Linear
from fdistill_jax.models.sd.layers import nearest_resize


class ResnetBlock2D(nn.Module):
  """norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU -> conv2, + shortcut.

  diffusers `ResnetBlock2D` with `time_embedding_norm='default'`, dropout 0
  (inference) and `output_scale_factor`; `conv_shortcut` (1x1) exists when the
  channel count changes. `temb=None` (the VAE) has no `time_emb_proj`.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
    h = Conv(self.out_channels, 3, name="conv1")(h)
    if temb is not None:
      t = Linear(self.out_channels, name="time_emb_proj")(nn.silu(temb))
      h = h + t.astype(h.dtype)[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
    h = Conv(self.out_channels, 3, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, name="conv_shortcut")(x)
    out = x + h
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 `conv`; padding 0 means diffusers' asymmetric (0, 1, 0, 1) pad."""
  out_channels: int
  padding: int = 1

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return Conv(self.out_channels, 3, stride=2, padding=pad, name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling to `size` (default 2x), then a 3x3 `conv`."""
  out_channels: int

  @nn.compact
  def __call__(self, x, size=None):
    size = size or (2 * x.shape[1], 2 * x.shape[2])
    return Conv(self.out_channels, 3, name="conv")(nearest_resize(x, size))


class GEGLU(nn.Module):
  """`proj` to 2 x inner channels, split (hidden, gate), hidden * GELU(gate) (exact GELU)."""
  inner: int

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(Linear(2 * self.inner, name="proj")(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: `net.0` (GEGLU), `net.2` (Linear)."""
  mult: int = 4

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    return Linear(dim, name="net_2")(GEGLU(dim * self.mult, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention (attn1), cross-attention (attn2), GEGLU feed-forward (ff)."""
  heads: int
  head_dim: int
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    attn = lambda name: Attention(self.heads, self.head_dim, attention=self.attention, name=name)
    x = attn("attn1")(LayerNorm(name="norm1")(x)) + x
    x = attn("attn2")(
        LayerNorm(name="norm2")(x), context) + x
    return FeedForward(name="ff")(LayerNorm(name="norm3")(x)) + x


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm (eps 1e-6), proj_in, blocks, proj_out, + input.

  `use_linear_projection` selects Linear projections on the flattened tokens
  (SD 2.x) instead of 1x1 convolutions (SD 1.x); both give the same tokens.
  """
  heads: int
  head_dim: int
  depth: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.groups, 1e-6, name="norm")(x)
    if self.use_linear_projection:
      y = Linear(inner, name="proj_in")(y.reshape(b, h * w, c))
    else:
      y = Conv(inner, 1, name="proj_in")(y).reshape(b, h * w, inner)
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.depth):
      y = block(self.heads, self.head_dim, self.attention, name=f"transformer_blocks_{i}")(
          y, context)
    if self.use_linear_projection:
      y = Linear(c, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = Conv(c, 1, name="proj_out")(y.reshape(b, h, w, inner))
    return y + x


def resnet(remat: bool):
  """ResnetBlock2D, wrapped in `nn.remat` when `remat`."""
  return nn.remat(ResnetBlock2D) if remat else ResnetBlock2D
