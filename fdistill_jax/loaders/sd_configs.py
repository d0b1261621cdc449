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


def _per_block(value, n, key):
  if isinstance(value, int):
    return (value,) * n
  if len(value) != n:
    raise ConversionError(f"UNet config: {key} has {len(value)} entries for {n} blocks.")
  return tuple(int(v) for v in value)


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


def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False):
  """UNet2DConditionModel from a diffusers `unet/config.json` dict."""
  c = resolve(config, UNET_KEYS, "UNet")
  _check_block_types(c)
  _check_addition_embedding(c)
  n = len(c["block_out_channels"])
  c["transformer_layers_per_block"] = _per_block(c["transformer_layers_per_block"], n,
                                                 "transformer_layers_per_block")
  # diffusers: num_attention_heads defaults to attention_head_dim (a historical misnomer).
  heads = _per_block(c.pop("num_attention_heads") or c["attention_head_dim"], n,
                     "num_attention_heads")
  c.pop("attention_head_dim")
  return UNet2DConditionModel(num_attention_heads=heads, dtype=dtype, remat=remat, **c)


def vae_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False):
  """(AutoencoderKL, scaling_factor, shift_factor) from a diffusers `vae/config.json` dict."""
  c = resolve(config, VAE_KEYS, "VAE")
  n = len(c["block_out_channels"])
  for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if tuple(c[key]) != (kind,) * n:
      raise ConversionError(f"VAE config: {key}={list(c[key])} is not implemented; expected "
                            f"{n} x {kind!r} (one per block_out_channels).")
  scale, shift = float(c.pop("scaling_factor")), c.pop("shift_factor")
  for key in ("down_block_types", "up_block_types"):
    c.pop(key)
  vae = AutoencoderKL(norm_num_groups=c.pop("norm_num_groups"), dtype=dtype, remat=remat, **c)
  return vae, scale, float(shift or 0.0)


def _activation(config, table) -> str:
  """hidden_act (checked by `resolve`, which returns only free keys): 'gelu' for SDXL's
  second text encoder (OpenCLIP bigG), 'quick_gelu' for OpenAI's CLIP."""
  return config.get("hidden_act", table["hidden_act"][0])


def text_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False):
  """CLIPTextModel from a transformers `text_encoder/config.json` dict."""
  if "text_config" in config:  # A full CLIPConfig.
    config = config["text_config"]
  c = resolve(config, TEXT_KEYS, "CLIP text", strict=False)
  c["hidden_act"] = _activation(config, TEXT_KEYS)
  return clip.CLIPTextModel(clip.CLIPTextTransformer(**c, dtype=dtype, remat=remat))


def text_with_projection_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False):
  """CLIPTextModelWithProjection from a CLIPTextConfig (with projection_dim) or a CLIPConfig
  (SDXL's `text_encoder_2/config.json` is the former)."""
  proj = config.get("projection_dim", 512)
  if "text_config" in config:
    config = config["text_config"]
  text = text_from_config(config, dtype, remat).text_model
  return clip.CLIPTextModelWithProjection(text, projection_dim=int(proj))


def vision_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat=False):
  """CLIPVisionModelWithProjection from a CLIPVisionConfig or a full CLIPConfig dict."""
  if "vision_config" in config:  # A full CLIPConfig: projection_dim is top-level.
    config = {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}
  c = resolve(config, VISION_KEYS, "CLIP vision", strict=False)
  c["hidden_act"] = _activation(config, VISION_KEYS)
  proj = c.pop("projection_dim")
  return clip.CLIPVisionModelWithProjection(
      clip.CLIPVisionTransformer(**c, dtype=dtype, remat=remat), projection_dim=proj)


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
