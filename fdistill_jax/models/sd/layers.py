"""Layers shared by the Stable Diffusion networks (Flax linen, NHWC).

Parameter names are those of the PyTorch references (diffusers
`models/attention_processor.py`, `models/resnet.py`; transformers
`models/clip/modeling_clip.py`): `weight` and `bias`, linear weights stored
`[in, out]` (PyTorch: `[out, in]`), convolution weights `HWIO` (PyTorch:
`OIHW`), embedding tables `[num, dim]` as in PyTorch.

Compute dtype: parameters are float32 and are cast to the dtype of the input,
as `networks.layers` does. Normalisation statistics, attention logits and the
softmax are computed in float32 whatever the compute dtype.

`attention` (a module attribute from the network down to `Attention`) picks
the attention kernel: `fdistill_jax.models.attention` ('xla' is the reference
math below).
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models import attention as attention_lib
from fdistill_jax.models.layers import GroupNorm as _EDMGroupNorm
from fdistill_jax.models.layers import Linear

__all__ = ["Linear", "Conv", "GroupNorm", "LayerNorm", "Embedding", "attention",
           "Attention", "nearest_resize"]

Padding = Union[int, Sequence[tuple]]


class Conv(nn.Module):
  """2-D convolution with PyTorch's padding semantics; `weight` is HWIO.

  `padding` is an int (the same on every side, PyTorch's `padding=p`) or
  `((top, bottom), (left, right))`; None means `kernel // 2`.
  """
  features: int
  kernel: int = 3
  stride: int = 1
  padding: Optional[Padding] = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, x.shape[-1], self.features))
    pad = self.kernel // 2 if self.padding is None else self.padding
    pad = [(pad, pad)] * 2 if isinstance(pad, int) else [tuple(p) for p in pad]
    x = jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), window_strides=(self.stride, self.stride), padding=pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    return x


def GroupNorm(num_groups: int, eps: float, name: str):  # pylint: disable=invalid-name
  """`torch.nn.GroupNorm(num_groups, C, eps)` (statistics in float32)."""
  return _EDMGroupNorm(num_groups=num_groups, min_channels_per_group=1, eps=eps, name=name)


class LayerNorm(nn.Module):
  """`torch.nn.LayerNorm(C, eps)` over the last axis, computed in float32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    y = x.astype(jnp.float32)
    mean = y.mean(axis=-1, keepdims=True)
    var = jnp.square(y - mean).mean(axis=-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * weight + bias).astype(x.dtype)


class Embedding(nn.Module):
  """`torch.nn.Embedding`: `weight` is `[num_embeddings, features]`."""
  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self, ids, dtype=jnp.float32):
    table = self.param("weight", nn.initializers.normal(0.02),
                       (self.num_embeddings, self.features))
    return jnp.take(table, ids, axis=0).astype(dtype)


def _reference_attention(q, k, v, causal):
  """The 'xla' reference: einsum logits and softmax in float32; q, k, v [B, L, H, d]."""
  lq, d = q.shape[1], q.shape[3]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(d).astype(np.float32)
  if causal:
    mask = np.tril(np.ones((lq, k.shape[1]), bool))
    logits = jnp.where(mask, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attention(q, k, v, heads: int, causal: bool = False, implementation: str = "xla"):
  """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

  Args:
    q: [B, Lq, H * d]; k, v: [B, Lk, H * d] (heads concatenated on the last axis,
      as PyTorch's `view(B, L, H, d)` splits them).
    heads: number of heads H.
    causal: mask keys after the query position (CLIP's text tower).
    implementation: an `fdistill_jax.models.attention.SETTINGS` name; 'xla'
      is the reference (logits and softmax in float32).

  Returns:
    [B, Lq, H * d] in the dtype of `v`.
  """
  b, lq, c = q.shape
  d = c // heads
  q = q.reshape(b, lq, heads, d)
  k = k.reshape(b, k.shape[1], heads, d)
  v = v.reshape(b, v.shape[1], heads, d)
  reference = lambda q, k, v: _reference_attention(q, k, v, causal)
  out = attention_lib.attend(q, k, v, implementation, reference, causal)
  return out.reshape(b, lq, heads * d)


class Attention(nn.Module):
  """Projected multi-head attention with configurable parameter names.

  diffusers' `Attention` names its projections `to_q`, `to_k`, `to_v`,
  `to_out.0` (the default here); transformers' CLIP attention names them
  `q_proj`, `k_proj`, `v_proj`, `out_proj`.

  Attributes:
    heads: number of heads.
    head_dim: channels per head (inner width = heads * head_dim).
    out_features: output width (None: the query width).
    qkv_bias: biases on the q, k, v projections (the output always has one).
    causal: causal mask (CLIP text).
    names: (q, k, v, out) submodule names.
    attention: the kernel (`fdistill_jax.models.attention.SETTINGS`).
  """
  heads: int
  head_dim: int
  out_features: Optional[int] = None
  qkv_bias: bool = False
  causal: bool = False
  names: tuple = ("to_q", "to_k", "to_v", "to_out_0")
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context.astype(x.dtype)
    inner = self.heads * self.head_dim
    qn, kn, vn, on = self.names
    q = Linear(inner, use_bias=self.qkv_bias, name=qn)(x)
    k = Linear(inner, use_bias=self.qkv_bias, name=kn)(context)
    v = Linear(inner, use_bias=self.qkv_bias, name=vn)(context)
    out = attention(q, k, v, self.heads, self.causal, self.attention)
    return Linear(self.out_features or x.shape[-1], name=on)(out)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  # PyTorch's 'nearest': src = floor(dst * (in / out)), scale in float32.
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(idx, size_in - 1)


def nearest_resize(x, size):
  """`F.interpolate(x, size, mode='nearest')` for NHWC `x` (2x: pixel repeat)."""
  h, w = size
  if (h, w) == (2 * x.shape[1], 2 * x.shape[2]):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, _nearest_indices(x.shape[1], h), axis=1)
  return jnp.take(x, _nearest_indices(x.shape[2], w), axis=2)
