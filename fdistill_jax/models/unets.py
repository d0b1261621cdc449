"""EDM's U-Nets: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM), NHWC.

Both follow NVlabs/edm `training/networks.py` module for module, with the same
names: a mapping network (`map_noise`, `map_label`, `map_augment`,
`map_layer0`, `map_layer1`), an encoder `enc` and a decoder `dec` whose blocks
are called `{res}x{res}_conv`, `{res}x{res}_down`, `{res}x{res}_block{i}`,
`{res}x{res}_in0`, `{res}x{res}_up`, `{res}x{res}_aux_*`. The layout of each
stage is a static tuple of `Step`s computed by a small planning function, so
the parameter tree can be read off without running the network.

Encoder features: `feature_resolutions=(32, 16)` makes the network also return
`{res: tensor}`, where the tensor is the encoder's last skip activation at that
resolution, i.e. the output of the last encoder block `{res}x{res}_block{N-1}`
(after the `aux_skip` / `aux_residual` merge for NCSN++ encoders), NHWC, in
the compute dtype. It is the tensor EDM hands to the decoder as a skip.
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.models.layers import Conv2d
from fdistill_jax.models.layers import FourierEmbedding
from fdistill_jax.models.layers import GroupNorm
from fdistill_jax.models.layers import Linear
from fdistill_jax.models.layers import PositionalEmbedding
from fdistill_jax.models.layers import UNetBlock
from fdistill_jax.models.layers import upsample


@dataclasses.dataclass(frozen=True)
class Step:
  """One named entry of an encoder or decoder (EDM's ModuleDict item)."""
  name: str
  op: str  # conv | block | aux_down | aux_skip | aux_residual | aux_up | aux_norm | aux_conv
  res: int
  out: int = 0
  up: bool = False
  down: bool = False
  heads: int = 0
  concat: bool = False  # Decoder blocks that first concatenate a skip.


def _encoder_steps(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                   attn_resolutions, heads_fn, encoder_type="standard", first_mult=False):
  """Encoder plan shared by SongUNet and DhariwalUNet (EDM's `self.enc`)."""
  steps, cout = [], in_channels
  for level, mult in enumerate(channel_mult):
    res = img_resolution >> level
    if level == 0:
      cout = model_channels * (mult if first_mult else 1)
      steps.append(Step(f"{res}x{res}_conv", "conv", res, cout))
    else:
      steps.append(Step(f"{res}x{res}_down", "block", res, cout, down=True))
      if encoder_type == "skip":
        steps.append(Step(f"{res}x{res}_aux_down", "aux_down", res))
        steps.append(Step(f"{res}x{res}_aux_skip", "aux_skip", res, cout))
      elif encoder_type == "residual":
        steps.append(Step(f"{res}x{res}_aux_residual", "aux_residual", res, cout))
    for idx in range(num_blocks):
      cout = model_channels * mult
      heads = heads_fn(cout) if res in attn_resolutions else 0
      steps.append(Step(f"{res}x{res}_block{idx}", "block", res, cout, heads=heads))
  return tuple(steps)


def _decoder_steps(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions,
                   heads_fn, attn_last_only, out_channels=0, decoder_type=None):
  """Decoder plan (EDM's `self.dec`); `decoder_type=None` adds no aux output layers."""
  steps, cout = [], model_channels * channel_mult[-1]
  for level in reversed(range(len(channel_mult))):
    res = img_resolution >> level
    if level == len(channel_mult) - 1:
      steps.append(Step(f"{res}x{res}_in0", "block", res, cout, heads=heads_fn(cout)))
      steps.append(Step(f"{res}x{res}_in1", "block", res, cout))
    else:
      steps.append(Step(f"{res}x{res}_up", "block", res, cout, up=True))
    for idx in range(num_blocks + 1):
      cout = model_channels * channel_mult[level]
      attn = res in attn_resolutions and (idx == num_blocks or not attn_last_only)
      steps.append(Step(f"{res}x{res}_block{idx}", "block", res, cout,
                        heads=heads_fn(cout) if attn else 0, concat=True))
    if decoder_type == "skip" or (decoder_type is not None and level == 0):
      if decoder_type == "skip" and level < len(channel_mult) - 1:
        steps.append(Step(f"{res}x{res}_aux_up", "aux_up", res))
      steps.append(Step(f"{res}x{res}_aux_norm", "aux_norm", res))
      steps.append(Step(f"{res}x{res}_aux_conv", "aux_conv", res, out_channels))
  return tuple(steps)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """UNetBlock settings shared by all blocks of one network."""
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: tuple = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  init_zero: nn.initializers.Initializer = nn.initializers.zeros
  init_attn: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  attention: str = "xla"

  def block(self, step: Step) -> UNetBlock:
    return UNetBlock(step.out, up=step.up, down=step.down, num_heads=step.heads,
                     name=step.name, **dataclasses.asdict(self))


class Encoder(nn.Module):
  """Runs an encoder plan; returns (x, skips, features by resolution)."""
  steps: tuple
  options: BlockOptions

  @nn.compact
  def __call__(self, x, emb, train=False):
    opt, skips, features, aux = self.options, [], {}, x
    for s in self.steps:
      if s.op == "aux_down":
        aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=opt.resample_filter,
                     name=s.name)(aux)
      elif s.op == "aux_skip":
        x = skips[-1] = x + Conv2d(s.out, 1, kernel_init=opt.init, name=s.name)(aux)
      elif s.op == "aux_residual":
        aux = Conv2d(s.out, 3, down=True, resample_filter=opt.resample_filter,
                     fused_resample=True, kernel_init=opt.init, name=s.name)(aux)
        x = skips[-1] = aux = (x + aux) / np.sqrt(2)
      elif s.op == "conv":
        x = Conv2d(s.out, 3, kernel_init=opt.init, name=s.name)(x)
        skips.append(x)
      else:
        x = opt.block(s)(x, emb, train)
        skips.append(x)
      features[s.res] = skips[-1]
    return x, skips, features


class Decoder(nn.Module):
  """Runs a decoder plan; returns (x, aux) where aux is the skip-decoder output."""
  steps: tuple
  options: BlockOptions

  @nn.compact
  def __call__(self, x, skips, emb, train=False):
    opt, skips, aux, tmp = self.options, list(skips), None, None
    for s in self.steps:
      if s.op == "aux_up":
        aux = upsample(aux, opt.resample_filter)
      elif s.op == "aux_norm":
        tmp = GroupNorm(eps=1e-6, name=s.name)(x)
      elif s.op == "aux_conv":
        tmp = Conv2d(s.out, 3, kernel_init=opt.init_zero, name=s.name)(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if s.concat:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = opt.block(s)(x, emb, train)
    return x, aux


def check_feature_resolutions(feature_resolutions, img_resolution, channel_mult):
  """Raises ValueError unless every requested resolution is an encoder resolution."""
  if feature_resolutions is None:
    return
  available = [img_resolution >> level for level in range(len(channel_mult))]
  missing = [r for r in feature_resolutions if r not in available]
  if missing:
    raise ValueError(
        f"feature_resolutions {tuple(feature_resolutions)} includes {missing}, but this "
        f"{img_resolution}x{img_resolution} U-Net's encoder has resolutions "
        f"{available}; request a subset of those.")


def _outputs(out, features, feature_resolutions):
  if feature_resolutions is None:
    return out
  return out, {r: features[r] for r in feature_resolutions}


def _drop_labels(module, labels, rate, train):
  """Label dropout for classifier-free guidance (train mode only, rng 'dropout')."""
  if not (train and rate):
    return labels
  keep = jax.random.uniform(module.make_rng("dropout"), (labels.shape[0], 1)) >= rate
  return labels * keep.astype(labels.dtype)


def _scaled_init(scale, distribution="uniform"):
  # EDM's kaiming_{uniform,normal} times init_weight = fan_in variance scaling.
  return nn.initializers.variance_scaling(scale, "fan_in", distribution)


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net (Song et al. 2021) as re-implemented by EDM."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[int] = (1, 1)
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"   # self-attention kernel (fdistill_jax.models.attention)

  def options(self) -> BlockOptions:
    xavier = nn.initializers.xavier_uniform
    return BlockOptions(
        dropout=self.dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
        resample_filter=tuple(self.resample_filter), resample_proj=True, adaptive_scale=False,
        init=xavier(), init_zero=nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform"),
        init_attn=nn.initializers.variance_scaling(0.2, "fan_avg", "uniform"),
        attention=self.attention)

  def plans(self):
    heads_fn = lambda c: 1
    enc = _encoder_steps(self.img_resolution, self.in_channels, self.model_channels,
                         self.channel_mult, self.num_blocks, self.attn_resolutions, heads_fn,
                         self.encoder_type)
    dec = _decoder_steps(self.img_resolution, self.model_channels, self.channel_mult,
                         self.num_blocks, self.attn_resolutions, heads_fn, attn_last_only=True,
                         out_channels=self.out_channels, decoder_type=self.decoder_type)
    return enc, dec

  def _embed(self, noise_labels, class_labels, augment_labels, train):
    noise_ch = self.model_channels * self.channel_mult_noise
    emb_ch = self.model_channels * self.channel_mult_emb
    if self.embedding_type == "positional":
      emb = PositionalEmbedding(noise_ch, endpoint=True, name="map_noise")(noise_labels)
    else:
      emb = FourierEmbedding(noise_ch, name="map_noise")(noise_labels)
    emb = jnp.concatenate([emb[:, noise_ch // 2:], emb[:, :noise_ch // 2]], axis=1)  # sin, cos
    if self.label_dim:
      labels = _drop_labels(self, class_labels, self.label_dropout, train)
      emb = emb + Linear(noise_ch, name="map_label")(labels * np.sqrt(self.label_dim))
    if self.augment_dim:
      emb = emb + Linear(noise_ch, use_bias=False, name="map_augment")(augment_labels)
    emb = nn.silu(Linear(emb_ch, name="map_layer0")(emb))
    return nn.silu(Linear(emb_ch, name="map_layer1")(emb))

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False,
               feature_resolutions=None):
    _check_choice("embedding_type", self.embedding_type, ("positional", "fourier"))
    _check_choice("encoder_type", self.encoder_type, ("standard", "skip", "residual"))
    _check_choice("decoder_type", self.decoder_type, ("standard", "skip"))
    check_feature_resolutions(feature_resolutions, self.img_resolution, self.channel_mult)
    emb = self._embed(noise_labels, class_labels, augment_labels, train)
    enc_steps, dec_steps = self.plans()
    opt = self.options()
    x, skips, feats = Encoder(enc_steps, opt, name="enc")(x.astype(self.dtype), emb, train)
    _, out = Decoder(dec_steps, opt, name="dec")(x, skips, emb, train)
    return _outputs(out, feats, feature_resolutions)


class DhariwalUNet(nn.Module):
  """ADM U-Net (Dhariwal & Nichol 2021) as re-implemented by EDM."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"   # self-attention kernel (fdistill_jax.models.attention)

  def options(self) -> BlockOptions:
    return BlockOptions(dropout=self.dropout, init=_scaled_init(1 / 3), init_zero=nn.initializers.zeros,
                        init_attn=_scaled_init(1 / 3), attention=self.attention)

  def plans(self):
    heads_fn = lambda c: c // 64
    enc = _encoder_steps(self.img_resolution, self.in_channels, self.model_channels,
                         self.channel_mult, self.num_blocks, self.attn_resolutions, heads_fn,
                         first_mult=True)
    dec = _decoder_steps(self.img_resolution, self.model_channels, self.channel_mult,
                         self.num_blocks, self.attn_resolutions, heads_fn, attn_last_only=False)
    return enc, dec

  def _embed(self, noise_labels, class_labels, augment_labels, train):
    emb_ch = self.model_channels * self.channel_mult_emb
    emb = PositionalEmbedding(self.model_channels, name="map_noise")(noise_labels)
    if self.augment_dim:
      emb = emb + Linear(self.model_channels, use_bias=False, kernel_init=nn.initializers.zeros,
                         name="map_augment")(augment_labels)
    emb = nn.silu(Linear(emb_ch, kernel_init=_scaled_init(1 / 3), name="map_layer0")(emb))
    emb = Linear(emb_ch, kernel_init=_scaled_init(1 / 3), name="map_layer1")(emb)
    if self.label_dim:
      labels = _drop_labels(self, class_labels, self.label_dropout, train)
      emb = emb + Linear(emb_ch, use_bias=False, kernel_init=_scaled_init(self.label_dim, "normal"),
                         name="map_label")(labels)
    return nn.silu(emb)

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False,
               feature_resolutions=None):
    check_feature_resolutions(feature_resolutions, self.img_resolution, self.channel_mult)
    emb = self._embed(noise_labels, class_labels, augment_labels, train)
    enc_steps, dec_steps = self.plans()
    opt = self.options()
    x, skips, feats = Encoder(enc_steps, opt, name="enc")(x.astype(self.dtype), emb, train)
    x, _ = Decoder(dec_steps, opt, name="dec")(x, skips, emb, train)
    x = nn.silu(GroupNorm(name="out_norm")(x))
    out = Conv2d(self.out_channels, 3, kernel_init=nn.initializers.zeros, name="out_conv")(x)
    return _outputs(out, feats, feature_resolutions)


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"SongUNet {field}={value!r} is not supported; use one of {allowed}.")
