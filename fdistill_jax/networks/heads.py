"""Discriminator heads on frozen diffusion-network features.

f-distill (Sec. 4, Table 5) estimates the density ratio r = p_teacher / q_student
with a GAN discriminator whose trunk is the frozen teacher's encoder: small
classification heads read the encoder activations at a few resolutions
((32, 16, 8) for CIFAR-10, (8,) for ImageNet-64). The discriminator logit of
the noisy generated sample is log r (mean over heads).

The heads accept image features (NHWC) and vector features ([B, C], the toy
MLP's hidden layers) alike.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvHead(nn.Module):
  """Conv -> SiLU -> strided conv -> SiLU -> global mean -> linear logit."""
  channels: int = 256
  num_groups: int = 32

  @nn.compact
  def __call__(self, h):
    groups = min(self.num_groups, h.shape[-1])
    while h.shape[-1] % groups:
      groups -= 1
    h = nn.GroupNorm(num_groups=groups, name="norm")(h)
    h = nn.silu(nn.Conv(self.channels, (3, 3), name="conv0")(h))
    strides = (2, 2) if min(h.shape[1:3]) >= 4 else (1, 1)
    h = nn.silu(nn.Conv(self.channels, (4, 4), strides=strides, name="conv1")(h))
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(1, name="out")(h)[:, 0]


class MLPHead(nn.Module):
  """LayerNorm -> Dense -> SiLU -> Dense logit, for vector features."""
  channels: int = 256

  @nn.compact
  def __call__(self, h):
    h = nn.LayerNorm(name="norm")(h)
    h = nn.silu(nn.Dense(self.channels, name="dense0")(h))
    return nn.Dense(1, name="out")(h)[:, 0]


class DiscriminatorHeads(nn.Module):
  """One head per feature key; returns per-head logits [B, num_heads].

  Attributes:
    keys: the feature keys (resolutions, or MLP layer indices) to read, in
      order; `features[key]` must exist for each.
    channels: width of every head.
  """
  keys: Sequence[int]
  channels: int = 256

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array]) -> jax.Array:
    missing = [k for k in self.keys if k not in features]
    if missing:
      raise ValueError(f"Discriminator heads need features {list(self.keys)}, "
                       f"missing {missing}; got {sorted(features)}.")
    logits = []
    for key in self.keys:
      h = features[key].astype(jnp.float32)
      head = ConvHead if h.ndim == 4 else MLPHead
      logits.append(head(self.channels, name=f"head_{key}")(h))
    return jnp.stack(logits, axis=-1)
