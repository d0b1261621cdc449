"""Discriminator heads on frozen diffusion-network features.

f-distill (Sec. 4, Table 5) estimates the density ratio r = p_teacher / q_student
with a GAN discriminator whose trunk is the frozen teacher's encoder: small
classification heads read the encoder activations at a few resolutions
((32, 16, 8) for CIFAR-10, (8,) for ImageNet-64). The discriminator logit of
the noisy generated sample is log r (mean over heads).

Two heads for image features: `DMD2Head` (DMD2's `cls_pred_branch`, NVIDIA
FastGen's `Discriminator_EDM`; the default of the paper configs) and the
lighter `ConvHead`. Vector features ([B, C], the toy MLP's hidden layers) get
an `MLPHead` with either choice.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvHead(nn.Module):
  """The light head: GroupNorm -> conv -> SiLU -> strided conv -> SiLU -> mean -> logit."""
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


def fastgen_groups(channels):
  """GroupNorm groups as FastGen's `_get_optimal_groups`: the largest divisor <= 32
  of the channel count (channels // 4, at least 1, for 32 channels or fewer)."""
  if channels <= 32:
    return max(1, channels // 4)
  groups = 32
  while channels % groups:
    groups -= 1
  return groups


class DMD2Head(nn.Module):
  """DMD2's / FastGen's head, as wide as the feature it reads (C channels).

  [4x4 conv stride 2 (padding 1) -> GroupNorm -> SiLU] while the map is larger
  than 4x4, then a conv whose kernel covers the map (FastGen: 4x4 stride 4,
  4x4 -> 1x1) -> GroupNorm -> SiLU, then a 1x1 conv to one logit. For maps of
  8, 16 or 32 pixels this is exactly `Discriminator_EDM`'s head (torch's
  GroupNorm epsilon 1e-5). Parameters: (n_down + 1) (16 C^2 + 3 C) + C + 1 for
  n_down stride-2 convs.
  """

  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    groups = fastgen_groups(c)
    layer = 0
    while min(h.shape[1:3]) > 4:
      h = nn.Conv(c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"conv{layer}")(h)
      h = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5, name=f"norm{layer}")(h))
      layer += 1
    size = tuple(h.shape[1:3])
    h = nn.Conv(c, size, strides=size, padding="VALID", name=f"conv{layer}")(h)
    h = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5, name=f"norm{layer}")(h))
    return nn.Conv(1, (1, 1), name="out")(h)[:, 0, 0, 0]


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
    channels: width of the light and MLP heads (a DMD2 head is as wide as
      its feature).
    head: 'dmd2' (`DMD2Head`) or 'light' (`ConvHead`) for image features.
  """
  keys: Sequence[int]
  channels: int = 256
  head: str = "dmd2"

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array]) -> jax.Array:
    missing = [k for k in self.keys if k not in features]
    if missing:
      raise ValueError(f"Discriminator heads need features {list(self.keys)}, "
                       f"missing {missing}; got {sorted(features)}.")
    logits = []
    for key in self.keys:
      h = features[key].astype(jnp.float32)
      if h.ndim != 4:
        head = MLPHead(self.channels, name=f"head_{key}")
      elif self.head == "dmd2":
        head = DMD2Head(name=f"head_{key}")
      else:
        head = ConvHead(self.channels, name=f"head_{key}")
      logits.append(head(h))
    return jnp.stack(logits, axis=-1)
