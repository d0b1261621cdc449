"""EDM's building blocks as Flax linen modules (NHWC).

Each module keeps the name of its EDM counterpart (NVlabs/edm
`training/networks.py`) and its parameter names (`weight`, `bias`), so an EDM
`state_dict()` maps onto these variables by a name map plus a layout change:
linear weights are stored `[in, out]` (EDM: `[out, in]`) and convolution
weights `HWIO` (EDM: `OIHW`). EDM's `resample_filter` buffers are constants
here, rebuilt from the `resample_filter` argument.

Compute dtype: parameters are stored in float32 and cast to the compute dtype
of the input, as EDM casts its weights to `x.dtype`. Group-norm statistics and
attention logits are always computed in float32.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models import attention as attention_lib


def _xavier_uniform():
  # EDM's default for SongUNet; Flax's own is identical up to layout.
  return nn.initializers.xavier_uniform()


def resample_kernel(resample_filter: Sequence[float]) -> np.ndarray:
  """Separable 2-D resampling filter f f^T / (sum f)^2, as EDM's Conv2d builds it."""
  f = np.asarray(resample_filter, dtype=np.float32)
  return np.outer(f, f) / np.square(f.sum())


def _depthwise(x, kernel, *, stride=1, lhs_dilation=1, padding=0):
  """Applies the same 2-D `kernel` to every channel of NHWC `x`."""
  channels = x.shape[-1]
  k = jnp.asarray(kernel, x.dtype)[:, :, None, None]
  k = jnp.tile(k, (1, 1, 1, channels))
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      lhs_dilation=(lhs_dilation, lhs_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def downsample(x, resample_filter=(1, 1), extra_pad=0):
  """EDM's strided depthwise filter (`conv2d(x, f, stride=2, padding=f_pad)`)."""
  f = resample_kernel(resample_filter)
  pad = (f.shape[0] - 1) // 2 + extra_pad
  if tuple(resample_filter) == (1, 1) and pad == 0:  # 2x2 box filter: a mean.
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return _depthwise(x, f, stride=2, padding=pad)


def upsample(x, resample_filter=(1, 1), extra_pad=0):
  """EDM's `conv_transpose2d(x, 4 f, stride=2, padding=f_pad)`, depthwise.

  A transposed convolution with padding p equals a convolution of the
  2x-dilated input with the flipped kernel and padding k - 1 - p (the filter is
  symmetric, so no flip is needed).
  """
  f = resample_kernel(resample_filter) * 4
  pad = (f.shape[0] - 1) // 2 + extra_pad
  if tuple(resample_filter) == (1, 1) and pad == 0:  # Nearest-neighbour.
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return _depthwise(x, f, lhs_dilation=2, padding=f.shape[0] - 1 - pad)


class Linear(nn.Module):
  """Fully-connected layer; `weight` is `[in, out]`."""
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = _xavier_uniform()

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", self.kernel_init, (x.shape[-1], self.features))
    x = x @ w.astype(x.dtype)
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    return x


class Conv2d(nn.Module):
  """EDM's Conv2d: optional 2x up/down resampling, then a `kernel` x `kernel` conv.

  `kernel=0` means no weights (a pure resampling layer). `fused_resample`
  follows EDM's order for fused layers: for `down`, convolve first and filter
  with stride 2 after; for `up`, upsample first with the combined padding.
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  kernel_init: nn.initializers.Initializer = _xavier_uniform()

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive; set at most one of them.")
    w = None
    if self.kernel:
      w = self.param("weight", self.kernel_init,
                     (self.kernel, self.kernel, x.shape[-1], self.features)).astype(x.dtype)
    w_pad = self.kernel // 2
    f_pad = (len(self.resample_filter) - 1) // 2
    if self.fused_resample and self.up and w is not None:
      x = upsample(x, self.resample_filter, extra_pad=w_pad)
      x = self._conv(x, w, 0)
    elif self.fused_resample and self.down and w is not None:
      x = self._conv(x, w, w_pad + f_pad)
      x = downsample(x, self.resample_filter, extra_pad=-f_pad)
    else:
      if self.up:
        x = upsample(x, self.resample_filter)
      if self.down:
        x = downsample(x, self.resample_filter)
      if w is not None:
        x = self._conv(x, w, w_pad)
    if w is not None and self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    return x

  @staticmethod
  def _conv(x, w, pad):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding=[(pad, pad)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class GroupNorm(nn.Module):
  """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = min(self.num_groups, c // self.min_channels_per_group)
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
    mean = y.mean(axis=axes, keepdims=True)
    var = jnp.square(y - mean).mean(axis=axes, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * weight + bias).astype(x.dtype)


def _reference_attention(q, k, v):
  """The 'xla' reference: float32 logits and softmax; q, k, v [B, L, H, d]."""
  logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
  weights = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v)


def attention(qkv, num_heads, implementation="xla"):
  """EDM's multi-head self-attention on a fused NHWC `qkv` tensor.

  EDM reshapes the 3C channels of `qkv` as (heads, C / heads, 3): channel
  `h * 3 d + 3 c + j` is component j (q, k, v) of channel c of head h. The
  kernel is `implementation` (`fdistill_jax.models.attention.SETTINGS`); the
  reference 'xla' computes q.k / sqrt(d) and the softmax in float32.

  Returns:
    `[B, H, W, C]` attention output, heads concatenated along channels.
  """
  b, h, w, c3 = qkv.shape
  d = c3 // (3 * num_heads)
  qkv = qkv.reshape(b, h * w, num_heads, d, 3)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  out = attention_lib.attend(q, k, v, implementation, _reference_attention)
  return out.reshape(b, h, w, num_heads * d)


class UNetBlock(nn.Module):
  """EDM's unified U-Net residual block (DDPM++, NCSN++ and ADM).

  Submodules: norm0, conv0, affine, norm1, conv1, skip (if the shape changes),
  and norm2, qkv, proj when `num_heads > 0`.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  num_heads: int = 0
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: nn.initializers.Initializer = _xavier_uniform()
  init_zero: nn.initializers.Initializer = nn.initializers.zeros
  init_attn: nn.initializers.Initializer = _xavier_uniform()
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    """x: [B, H, W, Cin] in the compute dtype; emb: [B, E] (float32)."""
    in_channels, cout = x.shape[-1], self.out_channels
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    orig = x
    x = Conv2d(cout, 3, kernel_init=self.init, name="conv0", **resample)(
        nn.silu(GroupNorm(eps=self.eps, name="norm0")(x)))
    params = Linear(cout * (2 if self.adaptive_scale else 1), kernel_init=self.init,
                    name="affine")(emb)[:, None, None, :].astype(x.dtype)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + GroupNorm(eps=self.eps, name="norm1")(x) * (scale + 1))
    else:
      x = nn.silu(GroupNorm(eps=self.eps, name="norm1")(x + params))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(cout, 3, kernel_init=self.init_zero, name="conv1")(x)
    if cout != in_channels or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != in_channels else 0
      orig = Conv2d(cout, kernel, kernel_init=self.init, name="skip", **resample)(orig)
    x = (x + orig) * self.skip_scale
    if self.num_heads:
      qkv = Conv2d(cout * 3, 1, kernel_init=self.init_attn, name="qkv")(
          GroupNorm(eps=self.eps, name="norm2")(x))
      a = attention(qkv, self.num_heads, self.attention)
      x = (Conv2d(cout, 1, kernel_init=self.init_zero, name="proj")(a) + x) * self.skip_scale
    return x


class PositionalEmbedding(nn.Module):
  """Sinusoidal embedding [cos(x w), sin(x w)], w_i = max_positions^(-i / (n/2 - endpoint))."""
  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x):
    half = self.num_channels // 2
    freqs = np.arange(half, dtype=np.float32) / (half - (1 if self.endpoint else 0))
    freqs = (1.0 / self.max_positions) ** freqs
    x = jnp.outer(x, jnp.asarray(freqs, x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2).

  The frequencies are EDM's `freqs` buffer: they live in the non-trainable
  'buffers' collection, so pass `{'params': ..., 'buffers': ...}` to apply.
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    freqs = self.variable(
        "buffers", "freqs",
        lambda: jax.random.normal(self.make_rng("params"), (self.num_channels // 2,)) * self.scale)
    x = jnp.outer(x, (2 * np.pi * freqs.value).astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
