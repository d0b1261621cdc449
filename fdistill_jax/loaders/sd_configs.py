"""config.json (diffusers / transformers) -> Flax modules, with the library defaults.

Every key a config may hold is listed with diffusers' (or transformers') own
default, so configs of the original 2022 release, which lack newer keys, load
as the libraries would load them. Each key is either *used* (any valid value),
*fixed* (only the listed values are implemented: anything else is refused
with a message naming the key), or *ignored* (bookkeeping that does not change
the network, e.g. `_diffusers_version`, `sample_size`, dropout rates of a
frozen network). Unknown keys of diffusers configs are refused, because a newer
diffusers may have added a key that changes the network. transformers configs
carry dozens of generic `PretrainedConfig` keys (generation settings, label
maps) whose list changes between versions and none of which changes CLIP's
towers, so their unknown keys are skipped.

The SD 1.5 configs themselves (runwayml/stable-diffusion-v1-5, as
`save_pretrained` writes them) are `SD15_CONFIGS`, for single-file checkpoints
that carry no config.
"""

import math
from typing import Any, Mapping

import jax.numpy as jnp

from fdistill_jax.loaders.errors import ConversionError
from fdistill_jax.models.sd import clip
from fdistill_jax.models.sd.unet import DOWN_BLOCK_TYPES
from fdistill_jax.models.sd.unet import UP_BLOCK_TYPES
from fdistill_jax.models.sd.unet import UNet2DConditionModel
from fdistill_jax.models.sd.vae import AutoencoderKL

USED, IGNORED = "used", "ignored"

# key: (default, USED | IGNORED | tuple of implemented values)
UNET_KEYS = {
    "sample_size": (None, IGNORED), "in_channels": (4, USED), "out_channels": (4, USED),
    "center_input_sample": (False, USED), "flip_sin_to_cos": (True, USED),
    "freq_shift": (0, USED),
    "down_block_types": (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), USED),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)),
    "up_block_types": (("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, USED),
    "only_cross_attention": (False, (False,)), "block_out_channels": ((320, 640, 1280, 1280), USED),
    "layers_per_block": (2, USED), "downsample_padding": (1, USED),
    "mid_block_scale_factor": (1, USED), "dropout": (0.0, IGNORED), "act_fn": ("silu", ("silu",)),
    "norm_num_groups": (32, USED), "norm_eps": (1e-5, USED), "cross_attention_dim": (1280, USED),
    "transformer_layers_per_block": (1, USED), "reverse_transformer_layers_per_block": (None, (None,)),
    "encoder_hid_dim": (None, (None,)), "encoder_hid_dim_type": (None, (None,)),
    "attention_head_dim": (8, USED), "num_attention_heads": (None, USED),
    "dual_cross_attention": (False, (False,)), "use_linear_projection": (False, USED),
    "class_embed_type": (None, (None,)), "addition_embed_type": (None, USED),
    "addition_time_embed_dim": (None, USED), "num_class_embeds": (None, (None,)),
    "upcast_attention": (False, IGNORED),  # Logits are always float32 here.
    "resnet_time_scale_shift": ("default", ("default",)), "resnet_skip_time_act": (False, (False,)),
    "resnet_out_scale_factor": (1.0, USED), "time_embedding_type": ("positional", ("positional",)),
    "time_embedding_dim": (None, USED), "time_embedding_act_fn": (None, (None,)),
    "timestep_post_act": (None, (None,)), "time_cond_proj_dim": (None, (None,)),
    "conv_in_kernel": (3, USED), "conv_out_kernel": (3, USED),
    "projection_class_embeddings_input_dim": (None, USED), "attention_type": ("default", ("default",)),
    "class_embeddings_concat": (False, (False,)), "mid_block_only_cross_attention": (None, (None, False)),
    "cross_attention_norm": (None, (None,)), "addition_embed_type_num_heads": (64, IGNORED),
}
VAE_KEYS = {
    "in_channels": (3, USED), "out_channels": (3, USED),
    "down_block_types": (("DownEncoderBlock2D",), USED), "up_block_types": (("UpDecoderBlock2D",), USED),
    "block_out_channels": ((64,), USED), "layers_per_block": (1, USED), "act_fn": ("silu", ("silu",)),
    "latent_channels": (4, USED), "norm_num_groups": (32, USED), "sample_size": (32, IGNORED),
    "scaling_factor": (0.18215, USED), "shift_factor": (None, USED),
    "latents_mean": (None, (None,)), "latents_std": (None, (None,)), "force_upcast": (True, IGNORED),
    "use_quant_conv": (True, USED), "use_post_quant_conv": (True, USED),
    "mid_block_add_attention": (True, USED),
}
TEXT_KEYS = {
    "vocab_size": (49408, USED), "hidden_size": (512, USED), "intermediate_size": (2048, USED),
    "num_hidden_layers": (12, USED), "num_attention_heads": (8, USED),
    "max_position_embeddings": (77, USED), "hidden_act": ("quick_gelu", tuple(clip.ACTIVATIONS)),
    "layer_norm_eps": (1e-5, USED), "eos_token_id": (49407, USED),
}
VISION_KEYS = {
    "hidden_size": (768, USED), "intermediate_size": (3072, USED), "num_hidden_layers": (12, USED),
    "num_attention_heads": (12, USED), "num_channels": (3, USED), "image_size": (224, USED),
    "patch_size": (32, USED), "hidden_act": ("quick_gelu", tuple(clip.ACTIVATIONS)),
    "layer_norm_eps": (1e-5, USED), "projection_dim": (512, USED),
}


# The schema of every used numeric key: (kind, low, high), kind "int", "float", "ints" (an
# int or a list of at most MAX_BLOCKS ints) or "int?" / "float?" (null allowed). Checked
# before any module is built: a wrong type or an absurd size is one line naming the key,
# not a raw Flax error or minutes of tracing.
MAX_BLOCKS = 8
MAX_PARAMS = 2e10               # SDXL's U-Net has 2.6e9 parameters, bigG's text tower 6.9e8
_CHANNELS = ("int", 1, 16384)
UNET_SCHEMA = {
    "in_channels": ("int", 1, 64), "out_channels": ("int", 1, 64),
    "block_out_channels": ("list", 1, 16384), "layers_per_block": ("int", 1, 16),
    "downsample_padding": ("int", 0, 3), "mid_block_scale_factor": ("float", 0, 1e3),
    "norm_num_groups": ("int", 1, 1024), "norm_eps": ("float", 1e-12, 1.0),
    "cross_attention_dim": ("int", 1, 16384), "transformer_layers_per_block": ("ints", 1, 64),
    "attention_head_dim": ("ints", 1, 1024), "num_attention_heads": ("ints?", 1, 1024),
    "freq_shift": ("float", -1e3, 1e3), "resnet_out_scale_factor": ("float", 1e-6, 1e3),
    "time_embedding_dim": ("int?", 1, 65536), "conv_in_kernel": ("int", 1, 7),
    "conv_out_kernel": ("int", 1, 7), "addition_time_embed_dim": ("int?", 1, 65536),
    "projection_class_embeddings_input_dim": ("int?", 1, 65536),
}
VAE_SCHEMA = {
    "in_channels": ("int", 1, 64), "out_channels": ("int", 1, 64),
    "block_out_channels": ("list", 1, 16384), "layers_per_block": ("int", 1, 16),
    "latent_channels": ("int", 1, 64), "norm_num_groups": ("int", 1, 1024),
}
TEXT_SCHEMA = {
    "vocab_size": ("int", 1, 1_000_000), "hidden_size": _CHANNELS,
    "intermediate_size": ("int", 1, 65536), "num_hidden_layers": ("int", 1, 64),
    "num_attention_heads": ("int", 1, 1024), "max_position_embeddings": ("int", 1, 1024),
    "layer_norm_eps": ("float", 1e-12, 1.0), "eos_token_id": ("int", 0, 1_000_000),
}
VISION_SCHEMA = {
    "hidden_size": _CHANNELS, "intermediate_size": ("int", 1, 65536),
    "num_hidden_layers": ("int", 1, 64), "num_attention_heads": ("int", 1, 1024),
    "num_channels": ("int", 1, 16), "image_size": ("int", 1, 1024),
    "patch_size": ("int", 1, 1024), "layer_norm_eps": ("float", 1e-12, 1.0),
    "projection_dim": _CHANNELS,
}


def _number_ok(value, kind, low, high) -> bool:
  if isinstance(value, bool):
    return False
  if kind == "int" and not isinstance(value, int):
    return False
  if kind == "float" and not (isinstance(value, (int, float)) and math.isfinite(value)):
    return False
  return low <= value <= high


def check_schema(c: Mapping[str, Any], schema: Mapping[str, tuple], what: str) -> None:
  """Every key of `schema` in `c` has its type and range (see `UNET_SCHEMA`), else one line."""
  for key, (kind, low, high) in schema.items():
    if key not in c:
      continue
    value = c[key]
    if kind.endswith("?"):
      if value is None:
        continue
      kind = kind[:-1]
    if kind in ("ints", "list"):
      listed = isinstance(value, (list, tuple))
      items = list(value) if listed else [value]
      ok = (listed or kind == "ints") and 1 <= len(items) <= MAX_BLOCKS and all(
          _number_ok(v, "int", low, high) for v in items)
      expected = (f"{'an integer' if kind == 'ints' else 'a list of 1 to '}"
                  f"{' in ' if kind == 'ints' else str(MAX_BLOCKS) + ' integers in '}"
                  f"[{low}, {high}]{f' or a list of 1 to {MAX_BLOCKS} of them' if kind == 'ints' else ''}")
    else:
      ok = _number_ok(value, kind, low, high)
      expected = f"{'an integer' if kind == 'int' else 'a finite number'} in [{low}, {high}]"
    if not ok:
      raise ConversionError(f"{what} config: {key}={short_value(value)} must be {expected}.")


def short_value(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _check_budget(count: float, what: str) -> None:
  if count > MAX_PARAMS:
    raise ConversionError(f"{what} config describes about {count:.3g} parameters, more than "
                          f"the {MAX_PARAMS:.0e} accepted: the file is corrupt or not a Stable "
                          "Diffusion / CLIP config.")


def _check_heads(width, heads, what, key="num_attention_heads"):
  if width % heads:
    raise ConversionError(f"{what} config: {key}={heads} does not divide hidden_size={width}.")


def resolve(config: Mapping[str, Any], table: Mapping[str, tuple], what: str,
            strict: bool = True) -> dict:
  """The config's used keys with defaults filled in; refuses values not implemented.

  Keys starting with '_' (`_class_name`, `_diffusers_version`, ...) are
  bookkeeping and skipped; other unknown keys are refused when `strict`.
  """
  unknown = sorted(k for k in config if not k.startswith("_") and k not in table)
  if unknown and strict:
    raise ConversionError(
        f"{what} config has keys {unknown} that this port does not know; they may change the "
        "network. Remove them if they hold the library default, or use a config written by "
        "diffusers 0.42 / transformers 5.")
  out = {}
  for key, (default, rule) in table.items():
    value = config.get(key, default)
    value = tuple(value) if isinstance(value, list) else value
    if isinstance(rule, tuple) and value not in rule:
      raise ConversionError(f"{what} config: {key}={value!r} is not implemented (supported: "
                            f"{list(rule)}); this port covers the Stable Diffusion 1.x/2.x and SDXL layouts.")
    if rule == USED:
      out[key] = value
  return out


def _finite_number(value) -> bool:
  """An int or float (not a bool) that is finite."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _per_block(value, n, key):
  if isinstance(value, int):
    return (value,) * n
  if len(value) != n:
    raise ConversionError(f"UNet config: {key} has {len(value)} entries for {n} blocks.")
  return tuple(int(v) for v in value)


def _check_groups(c, what):
  """GroupNorm's groups must divide every block's channels."""
  groups = c["norm_num_groups"]
  bad = [ch for ch in c["block_out_channels"] if ch % groups]
  if bad:
    raise ConversionError(f"{what} config: norm_num_groups={groups} does not divide "
                          f"block_out_channels {bad[:4]}.")


def _check_block_types(c):
  n = len(c["block_out_channels"])
  for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
    bad = [t for t in c[key] if t not in allowed]
    if bad or len(c[key]) != n:
      raise ConversionError(
          f"UNet config: {key}={list(c[key])} must list {n} blocks (one per block_out_channels) "
          f"from {list(allowed)}; {bad or 'the count differs'} is not implemented.")
  for key in ("layers_per_block", "cross_attention_dim"):
    if not isinstance(c[key], int):
      raise ConversionError(f"UNet config: per-block {key}={c[key]!r} is not implemented; "
                            "use one integer for all blocks.")
  depth = c["transformer_layers_per_block"]
  if not isinstance(depth, int) and not all(isinstance(d, int) for d in depth):
    raise ConversionError(f"UNet config: transformer_layers_per_block={depth!r} (per resnet) is "
                          "not implemented; use one integer, or one integer per block.")


def _check_addition_embedding(c):
  """SDXL's "text_time" added embedding needs both of its widths; others are refused."""
  kind = c["addition_embed_type"]
  if kind not in (None, "text_time"):
    raise ConversionError(f"UNet config: addition_embed_type={kind!r} is not implemented "
                          "(supported: None, 'text_time' as in SDXL).")
  widths = (c["addition_time_embed_dim"], c["projection_class_embeddings_input_dim"])
  if kind == "text_time" and not all(isinstance(w, int) and w > 0 for w in widths):
    raise ConversionError("UNet config: addition_embed_type='text_time' needs positive integers "
                          f"addition_time_embed_dim and projection_class_embeddings_input_dim; "
                          f"got {widths}.")


def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False, attention="xla"):
  """UNet2DConditionModel from a diffusers `unet/config.json` dict."""
  c = resolve(config, UNET_KEYS, "UNet")
  check_schema(c, {"block_out_channels": UNET_SCHEMA["block_out_channels"]}, "UNet")
  _check_block_types(c)          # names per-block layers_per_block / cross_attention_dim
  check_schema(c, UNET_SCHEMA, "UNet")
  _check_groups(c, "UNet")
  _check_addition_embedding(c)
  n = len(c["block_out_channels"])
  c["transformer_layers_per_block"] = _per_block(c["transformer_layers_per_block"], n,
                                                 "transformer_layers_per_block")
  # diffusers: num_attention_heads defaults to attention_head_dim (a historical misnomer).
  heads = _per_block(c.pop("num_attention_heads") or c["attention_head_dim"], n,
                     "num_attention_heads")
  c.pop("attention_head_dim")
  chans, depth = c["block_out_channels"], c["layers_per_block"]
  # Resnets (two 3x3 convs) and transformers (~12 c^2 each, plus cross-attention) per layer,
  # down and up (up has one more layer): a generous upper estimate.
  _check_budget(sum((2 * depth + 1) * (18 * ch * ch + max(c["transformer_layers_per_block"])
                                       * (12 * ch * ch + 2 * ch * c["cross_attention_dim"]))
                    for ch in chans), "UNet")
  return UNet2DConditionModel(num_attention_heads=heads, dtype=dtype, remat=remat,
                              attention=attention, **c)


def vae_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False, attention="xla"):
  """(AutoencoderKL, scaling_factor, shift_factor) from a diffusers `vae/config.json` dict."""
  c = resolve(config, VAE_KEYS, "VAE")
  check_schema(c, VAE_SCHEMA, "VAE")
  _check_groups(c, "VAE")
  _check_budget(2 * (2 * c["layers_per_block"] + 2) * sum(
      18 * ch * ch for ch in c["block_out_channels"]), "VAE")
  n = len(c["block_out_channels"])
  for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if tuple(c[key]) != (kind,) * n:
      raise ConversionError(f"VAE config: {key}={list(c[key])} is not implemented; expected "
                            f"{n} x {kind!r} (one per block_out_channels).")
  scale, shift = c.pop("scaling_factor"), c.pop("shift_factor")
  if not _finite_number(scale) or not 0 < scale <= 1e3:
    raise ConversionError(f"VAE config: scaling_factor={scale!r} must be a finite number in "
                          "(0, 1000] (SD 1.5: 0.18215, SDXL: 0.13025); the file is corrupt.")
  if shift is not None and (not _finite_number(shift) or abs(shift) > 1e3):
    raise ConversionError(f"VAE config: shift_factor={shift!r} must be null or a finite number "
                          "of magnitude <= 1000.")
  scale = float(scale)
  for key in ("down_block_types", "up_block_types"):
    c.pop(key)
  vae = AutoencoderKL(norm_num_groups=c.pop("norm_num_groups"), dtype=dtype, remat=remat,
                      attention=attention, **c)
  return vae, scale, float(shift or 0.0)


def _activation(config, table) -> str:
  """hidden_act (checked by `resolve`, which returns only free keys): 'gelu' for SDXL's
  second text encoder (OpenCLIP bigG), 'quick_gelu' for OpenAI's CLIP."""
  return config.get("hidden_act", table["hidden_act"][0])


def text_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False, attention="xla"):
  """CLIPTextModel from a transformers `text_encoder/config.json` dict."""
  if "text_config" in config:  # A full CLIPConfig.
    config = config["text_config"]
  c = resolve(config, TEXT_KEYS, "CLIP text", strict=False)
  check_schema(c, TEXT_SCHEMA, "CLIP text")
  _check_heads(c["hidden_size"], c["num_attention_heads"], "CLIP text")
  h = c["hidden_size"]
  _check_budget(c["num_hidden_layers"] * (4 * h * h + 2 * h * c["intermediate_size"])
                + (c["vocab_size"] + c["max_position_embeddings"]) * h, "CLIP text")
  c["hidden_act"] = _activation(config, TEXT_KEYS)
  return clip.CLIPTextModel(clip.CLIPTextTransformer(**c, dtype=dtype, remat=remat,
                                                         attention=attention))


def text_with_projection_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False,
                                     attention="xla"):
  """CLIPTextModelWithProjection from a CLIPTextConfig (with projection_dim) or a CLIPConfig
  (SDXL's `text_encoder_2/config.json` is the former)."""
  proj = config.get("projection_dim", 512)
  if "text_config" in config:
    config = config["text_config"]
  if isinstance(proj, bool) or not isinstance(proj, int) or not 1 <= proj <= 16384:
    raise ConversionError(f"CLIP text config: projection_dim={short_value(proj)} must be an "
                          "integer in [1, 16384].")
  text = text_from_config(config, dtype, remat, attention).text_model
  return clip.CLIPTextModelWithProjection(text, projection_dim=int(proj))


def check_vision(c: Mapping[str, Any], what: str) -> None:
  """A vision transformer's resolved config (CLIP's vision tower, DINO's ViT) against
  `VISION_SCHEMA`: ranges, heads dividing the width, patches fitting the image, the budget."""
  check_schema(c, VISION_SCHEMA, what)
  _check_heads(c["hidden_size"], c["num_attention_heads"], what)
  if c["patch_size"] > c["image_size"]:
    raise ConversionError(f"{what} config: patch_size={c['patch_size']} is larger than "
                          f"image_size={c['image_size']}.")
  h = c["hidden_size"]
  _check_budget(c["num_hidden_layers"] * (4 * h * h + 2 * h * c["intermediate_size"])
                + (c["image_size"] // c["patch_size"]) ** 2 * h
                + c["num_channels"] * c["patch_size"] ** 2 * h, what)


def vision_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False, attention="xla"):
  """CLIPVisionModelWithProjection from a CLIPVisionConfig or a full CLIPConfig dict."""
  if "vision_config" in config:  # A full CLIPConfig: projection_dim is top-level.
    config = {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}
  c = resolve(config, VISION_KEYS, "CLIP vision", strict=False)
  check_vision(c, "CLIP vision")
  c["hidden_act"] = _activation(config, VISION_KEYS)
  proj = c.pop("projection_dim")
  return clip.CLIPVisionModelWithProjection(
      clip.CLIPVisionTransformer(**c, dtype=dtype, remat=remat, attention=attention),
      projection_dim=proj)


SD15_CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "sample_size": 64},
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
            "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "max_position_embeddings": 77,
                     "hidden_act": "quick_gelu", "projection_dim": 768, "eos_token_id": 49407},
    "scheduler": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False},
}
# openai/clip-vit-large-patch14's vision tower with its projection (CLIP score).
CLIP_VIT_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                       "projection_dim": 768, "hidden_act": "quick_gelu"}
