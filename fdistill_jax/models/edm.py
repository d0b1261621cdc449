"""EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7) and the network registry.

`build_edm(arch)` takes the `EDMPrecond` constructor arguments as EDM records
them (`model_type`, `img_resolution`, `img_channels`, `label_dim`,
`sigma_data`, then the U-Net's own arguments) and returns a Flax module

  D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),

with c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
c_in = 1 / sqrt(sigma^2 + s_d^2) and c_noise = log(sigma) / 4.

Example:

  net = build_edm(CIFAR10_ARCH)
  variables = variables_from_state_dict(CIFAR10_ARCH, state_dict)
  denoised = net.apply(variables, x_nhwc, sigma, one_hot_labels)
  denoised, feats = net.apply(variables, x_nhwc, sigma, one_hot_labels,
                              feature_resolutions=(8,))
"""

import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from fdistill_jax.models.unets import DhariwalUNet
from fdistill_jax.models.unets import SongUNet

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

# EDMPrecond's own arguments; the rest go to the U-Net named by model_type.
_PRECOND_KEYS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                 "sigma_max", "sigma_data", "model_type", "precond")
_MODEL_KEYS = {
    "SongUNet": ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb",
                 "num_blocks", "attn_resolutions", "dropout", "label_dropout",
                 "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type",
                 "resample_filter"),
    "DhariwalUNet": ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb",
                     "num_blocks", "attn_resolutions", "dropout", "label_dropout"),
}

# edm-cifar10-32x32-cond-vp: DDPM++ with EDM preconditioning, 55,735,299 parameters.
CIFAR10_ARCH = {
    "precond": "EDMPrecond", "model_type": "SongUNet", "img_resolution": 32, "img_channels": 3,
    "label_dim": 10, "augment_dim": 9, "model_channels": 128, "channel_mult": [2, 2, 2],
    "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.13, "embedding_type": "positional",
    "encoder_type": "standard", "decoder_type": "standard", "channel_mult_noise": 1,
    "resample_filter": [1, 1],
}
# edm-imagenet-64x64-cond-adm: ADM with EDM preconditioning, 295,899,267 parameters.
IMAGENET64_ARCH = {
    "precond": "EDMPrecond", "model_type": "DhariwalUNet", "img_resolution": 64,
    "img_channels": 3, "label_dim": 1000, "model_channels": 192, "channel_mult": [1, 2, 3, 4],
    "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.1,
}
# Tiny variants for tests (the shapes of the shared EDM fixtures).
SONGUNET_TINY_ARCH = {
    "precond": "EDMPrecond", "model_type": "SongUNet", "img_resolution": 16, "img_channels": 3,
    "label_dim": 10, "model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 2,
    "attn_resolutions": [8], "dropout": 0.13, "embedding_type": "positional",
    "encoder_type": "standard", "decoder_type": "standard", "channel_mult_noise": 1,
    "resample_filter": [1, 1],
}
DHARIWAL_TINY_ARCH = {
    "precond": "EDMPrecond", "model_type": "DhariwalUNet", "img_resolution": 16,
    "img_channels": 3, "label_dim": 10, "model_channels": 32, "channel_mult": [1, 2, 4],
    "num_blocks": 2, "attn_resolutions": [8, 4], "dropout": 0.1,
}
ARCHS = {"cifar10": CIFAR10_ARCH, "imagenet64": IMAGENET64_ARCH,
         "songunet_tiny": SONGUNET_TINY_ARCH, "dhariwal_tiny": DHARIWAL_TINY_ARCH}

# What an architecture may declare (EDM's networks sit far inside these bounds). Checked
# before anything is built or traced, because the arguments often come from a file.
MAX_RESOLUTION = 1024
MAX_LEVELS = 8
_INT_RANGES = {"img_resolution": (1, MAX_RESOLUTION), "img_channels": (1, 64),
               "label_dim": (0, 100_000), "augment_dim": (0, 1024),
               "model_channels": (1, 2048), "channel_mult_emb": (1, 16),
               "channel_mult_noise": (1, 16), "num_blocks": (1, 32)}
_CHOICES = {"precond": ("EDMPrecond",), "model_type": tuple(MODEL_TYPES),
            "embedding_type": ("positional", "fourier"),
            "encoder_type": ("standard", "skip", "residual"),
            "decoder_type": ("standard", "skip")}


def _is_int(v):
  return type(v) is int


def _is_real(v):
  return type(v) in (int, float) and v == v   # not NaN


def _int_list(arch, key, lo, hi, max_len):
  value = arch[key]
  if (not isinstance(value, (list, tuple)) or len(value) > max_len
      or not all(_is_int(v) and lo <= v <= hi for v in value)):
    raise ValueError(f"arch {key}={str(value)[:80]}: expected a list of at most {max_len} "
                     f"integers in [{lo}, {hi}].")


def check_arch(arch: Mapping[str, Any]) -> None:
  """Checks EDMPrecond arguments (types, ranges, sizes) before anything is built.

  The arguments usually come from a file (a snapshot's recorded `_init_kwargs`,
  `arch.json`, `generator_spec.json`), so nothing here trusts them: integers
  must be plain ints in `_INT_RANGES`, lists short, strings one of the known
  choices, and the resolution divisible by 2 per encoder level.

  Raises:
    ValueError: naming the argument, its value and what is accepted.
  """
  if not isinstance(arch, Mapping) or not all(isinstance(k, str) for k in arch):
    raise ValueError("arch must be a JSON object of EDMPrecond arguments.")
  for key, (lo, hi) in _INT_RANGES.items():
    if key in arch and not (_is_int(arch[key]) and lo <= arch[key] <= hi):
      raise ValueError(f"arch {key}={str(arch[key])[:80]}: expected an integer in [{lo}, {hi}].")
  for key, choices in _CHOICES.items():
    if key in arch and arch[key] not in choices:
      raise ValueError(f"arch {key}={str(arch[key])[:80]}: expected one of {list(choices)}.")
  for key in ("img_resolution", "img_channels"):
    if key not in arch:
      raise ValueError(f"arch has no {key}: expected EDMPrecond arguments.")
  if "channel_mult" in arch:
    _int_list(arch, "channel_mult", 1, 16, MAX_LEVELS)
  if "attn_resolutions" in arch:
    _int_list(arch, "attn_resolutions", 1, MAX_RESOLUTION, 16)
  if "resample_filter" in arch:
    _int_list(arch, "resample_filter", 1, 1000, 8)
  for key in ("dropout", "label_dropout"):
    if key in arch and not (_is_real(arch[key]) and 0 <= arch[key] <= 1):
      raise ValueError(f"arch {key}={str(arch[key])[:80]}: expected a number in [0, 1].")
  for key in ("sigma_min", "sigma_max", "sigma_data"):
    if key in arch and not (_is_real(arch[key]) and arch[key] >= 0):
      raise ValueError(f"arch {key}={str(arch[key])[:80]}: expected a non-negative number.")
  if "use_fp16" in arch and not isinstance(arch["use_fp16"], bool):
    raise ValueError(f"arch use_fp16={str(arch['use_fp16'])[:80]}: expected true or false.")
  levels = len(arch.get("channel_mult", (1, 2, 3, 4)))
  if levels < 1 or arch["img_resolution"] % (1 << (levels - 1)):
    raise ValueError(f"arch img_resolution={arch['img_resolution']} must be divisible by "
                     f"2^{levels - 1} for {levels} channel_mult levels.")


def edm_precond_coefficients(sigma, sigma_data):
  """EDM preconditioning (Karras et al. 2022, Table 1, Eq. 7).

  Args:
    sigma: noise levels, any shape.
    sigma_data: standard deviation of the data.

  Returns:
    (c_skip, c_out, c_in, c_noise), each with the shape of `sigma`.
  """
  sigma_data2 = sigma_data**2
  c_skip = sigma_data2 / (sigma**2 + sigma_data2)
  c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data2)
  c_in = 1.0 / jnp.sqrt(sigma_data2 + sigma**2)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
  """EDM's preconditioned denoiser D(x; sigma) around a U-Net `model`.

  Attributes:
    model: SongUNet or DhariwalUNet (its params live under 'model').
    label_dim: number of classes; 0 = unconditional.
    sigma_data: expected data standard deviation s_d.
    sigma_min, sigma_max: supported noise range (informational, for samplers).
  """
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  sigma_data: float = 0.5
  sigma_min: float = 0.0
  sigma_max: float = math.inf

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, *, augment_labels=None, train=False,
               feature_resolutions=None):
    """Denoises NHWC `x` at noise level `sigma` ([B], scalar or broadcastable).

    Args:
      x: [B, H, W, C] noisy images (cast to float32).
      sigma: noise levels, any shape with B or 1 elements.
      class_labels: [B, label_dim] (one-hot) or None (zeros) for conditional nets.
      augment_labels: [B, augment_dim] or None (zeros) when the net has augment_dim.
      train: enables dropout and label dropout (both need a 'dropout' rng).
      feature_resolutions: optional encoder resolutions to also return.

    Returns:
      float32 [B, H, W, C] denoised images, or `(denoised, {res: features})`.
    """
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (b,))
    labels = self._labels(class_labels, b)
    aug = None
    if getattr(self.model, "augment_dim", 0):
      aug = (jnp.zeros((b, self.model.augment_dim), jnp.float32) if augment_labels is None
             else jnp.asarray(augment_labels, jnp.float32).reshape(b, -1))
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, self.sigma_data)
    c_skip, c_out, c_in = (c[:, None, None, None] for c in (c_skip, c_out, c_in))
    out = self.model(c_in * x, c_noise, labels, aug, train=train,
                     feature_resolutions=feature_resolutions)
    f_x, feats = out if feature_resolutions is not None else (out, None)
    denoised = c_skip * x + c_out * f_x.astype(jnp.float32)
    return denoised if feature_resolutions is None else (denoised, feats)

  def _labels(self, class_labels, batch):
    if not self.label_dim:
      return None
    if class_labels is None:
      return jnp.zeros((batch, self.label_dim), jnp.float32)
    labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)
    return jnp.broadcast_to(labels, (batch, self.label_dim))


def _tuples(kwargs):
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}


def build_edm(arch: Mapping[str, Any], dtype=jnp.float32, attention="xla") -> EDMPrecond:
  """EDMPrecond from EDM's constructor arguments (see the module docstring).

  Args:
    arch: EDMPrecond kwargs as EDM records them. 'precond' (must be
      'EDMPrecond') and 'use_fp16' are accepted and ignored.
    dtype: compute dtype of the U-Net (parameters stay float32; the output
      and the preconditioning are float32).
    attention: the self-attention kernel (`fdistill_jax.models.attention.SETTINGS`).

  Raises:
    ValueError: unknown model_type, precond or keys, or values out of range (`check_arch`).
  """
  check_arch(arch)
  arch = dict(arch)
  model_type = arch.get("model_type", "DhariwalUNet")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"Unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}.")
  if arch.get("precond", "EDMPrecond") != "EDMPrecond":
    raise ValueError(f"precond={arch['precond']!r} is not supported: only EDMPrecond is "
                     "ported (VP/VE/iDDPM preconditioning is not).")
  unknown = sorted(set(arch) - set(_PRECOND_KEYS) - set(_MODEL_KEYS[model_type]))
  if unknown:
    raise ValueError(f"Unknown {model_type} arch keys {unknown}; accepted keys are "
                     f"{sorted(_PRECOND_KEYS + _MODEL_KEYS[model_type])}. Remove them or "
                     "convert them before calling build_edm.")
  model_kwargs = _tuples({k: arch[k] for k in _MODEL_KEYS[model_type] if k in arch})
  model = MODEL_TYPES[model_type](
      img_resolution=arch["img_resolution"], in_channels=arch["img_channels"],
      out_channels=arch["img_channels"], label_dim=arch.get("label_dim", 0), dtype=dtype,
      attention=attention, **model_kwargs)
  return EDMPrecond(
      model=model, img_resolution=arch["img_resolution"], img_channels=arch["img_channels"],
      label_dim=arch.get("label_dim", 0), sigma_data=float(arch.get("sigma_data", 0.5)),
      sigma_min=float(arch.get("sigma_min", 0.0)),
      sigma_max=float(arch.get("sigma_max", math.inf)))
