"""ViT image encoder (transformers 5 `models/vit/modeling_vit.py`, `ViTModel`), Flax linen.

The architecture of DINO's ViTs (Caron et al., 2021; `facebook/dino-vitb8` and friends are
`ViTModel` checkpoints): patch embedding (stride-`patch_size` convolution with bias), class
token, position embeddings, pre-norm transformer layers (`layernorm_before`, attention,
`layernorm_after`, GELU MLP), final `layernorm`. Returns the last hidden state; DINO's image
feature is its class token. Parameter trees mirror the state dict (`encoder/layer_3/...`,
see `sd.names`); the pooler is not ported.

Inputs of another size than `image_size` use transformers' `interpolate_pos_encoding`:
the patch grid of position embeddings resized with PyTorch's bicubic interpolation
(`F.interpolate(mode="bicubic", align_corners=False)`, A = -0.75, edges clamped), here as
exact interpolation matrices (`torch_bicubic_matrix`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models.sd.layers import Conv
from fdistill_jax.models.sd.layers import LayerNorm
from fdistill_jax.models.sd.layers import Linear
from fdistill_jax.models.sd.layers import attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic resize (align_corners=False) along one axis."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  x0 = np.floor(src).astype(np.int64)
  t = src - x0
  cubic_near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # |x| <= 1
  cubic_far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a       # 1 < |x| < 2
  taps = (cubic_far(t + 1), cubic_near(t), cubic_near(1 - t), cubic_far(2 - t))
  weights = np.zeros((n_out, n_in))
  for offset, w in zip((-1, 0, 1, 2), taps):
    np.add.at(weights, (np.arange(n_out), np.clip(x0 + offset, 0, n_in - 1)), w)
  return weights.astype(np.float32)


class _Dense(nn.Module):
  """A submodule holding one linear layer called `dense` (the reference's nesting)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return Linear(self.features, name="dense")(x)


class _SelfAttention(nn.Module):
  heads: int
  qkv_bias: bool = True
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    q, k, v = (Linear(d, use_bias=self.qkv_bias, name=n)(x) for n in ("query", "key", "value"))
    return attention(q, k, v, self.heads, implementation=self.attention)


class _Attention(nn.Module):
  heads: int
  qkv_bias: bool = True
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    h = _SelfAttention(self.heads, self.qkv_bias, self.attention, name="attention")(x)
    return _Dense(x.shape[-1], name="output")(h)


class ViTLayer(nn.Module):
  heads: int
  intermediate_size: int
  eps: float = 1e-12
  qkv_bias: bool = True
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    x = x + _Attention(self.heads, self.qkv_bias, self.attention, name="attention")(
        LayerNorm(self.eps, name="layernorm_before")(x))
    h = _Dense(self.intermediate_size, name="intermediate")(
        LayerNorm(self.eps, name="layernorm_after")(x))
    return x + _Dense(x.shape[-1], name="output")(jax.nn.gelu(h, approximate=False))


class _Encoder(nn.Module):
  num_layers: int
  heads: int
  intermediate_size: int
  eps: float
  qkv_bias: bool
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ViTLayer(self.heads, self.intermediate_size, self.eps, self.qkv_bias, self.attention,
                   name=f"layer_{i}")(x)
    return x


class _PatchEmbeddings(nn.Module):
  hidden_size: int
  patch_size: int

  @nn.compact
  def __call__(self, pixels):
    return Conv(self.hidden_size, self.patch_size, stride=self.patch_size, padding=0,
                name="projection")(pixels)


class _Embeddings(nn.Module):
  hidden_size: int
  image_size: int
  patch_size: int

  @nn.compact
  def __call__(self, pixels):
    b, h, w, _ = pixels.shape
    x = _PatchEmbeddings(self.hidden_size, self.patch_size, name="patch_embeddings")(pixels)
    gh, gw = h // self.patch_size, w // self.patch_size
    x = x[:, :gh, :gw].reshape(b, gh * gw, self.hidden_size)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.hidden_size))
    n = self.image_size // self.patch_size
    pos = self.param("position_embeddings", nn.initializers.normal(0.02),
                     (1, n * n + 1, self.hidden_size))
    patch_pos = pos[0, 1:]
    if (gh, gw) != (n, n):   # transformers' interpolate_pos_encoding
      grid = patch_pos.reshape(n, n, self.hidden_size)
      hi = jax.lax.Precision.HIGHEST
      grid = jnp.einsum("oh,hwc->owc", torch_bicubic_matrix(n, gh), grid, precision=hi)
      grid = jnp.einsum("pw,owc->opc", torch_bicubic_matrix(n, gw), grid, precision=hi)
      patch_pos = grid.reshape(gh * gw, self.hidden_size)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)), x], axis=1)
    return x + jnp.concatenate([pos[0, :1], patch_pos])[None]


class ViTModel(nn.Module):
  """transformers `ViTModel` without pooler: pixels [B, H, W, C] (NHWC, normalised) ->
  last hidden state [B, 1 + (H/P)(W/P), D], float32. Element 0 is the class token."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  attention: str = "xla"   # attention kernel (fdistill_jax.models.attention)

  @nn.compact
  def __call__(self, pixels):
    x = _Embeddings(self.hidden_size, self.image_size, self.patch_size,
                    name="embeddings")(jnp.asarray(pixels, jnp.float32))
    x = _Encoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                 self.layer_norm_eps, self.qkv_bias, self.attention, name="encoder")(x)
    return LayerNorm(self.layer_norm_eps, name="layernorm")(x)
