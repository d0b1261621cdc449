"""Single-file Stable Diffusion checkpoints (CompVis / LDM key names) -> diffusers names.

`v1-5-pruned-emaonly.safetensors` / `.ckpt` hold the three networks under
`model.diffusion_model.` (U-Net, `openaimodel.py` names), `first_stage_model.`
(VAE, `ldm/modules/diffusionmodules/model.py` names) and
`cond_stage_model.transformer.` (the transformers CLIP text model, older
files without the `text_model.` level), next to schedule buffers
(`betas`, `alphas_cumprod`, ...) and, in non-pruned files, EMA copies under
`model_ema.` (dots removed from the names).

The map is built per module from the architecture (explicit dictionaries of
module prefixes, so it is invertible and testable), then applied key by key:

  LDM U-Net                                  diffusers
  input_blocks.0.0                           conv_in
  input_blocks.{k}.0 / .1                    down_blocks.{i}.resnets.{j} / attentions.{j}
  input_blocks.{k}.0.op                      down_blocks.{i}.downsamplers.0.conv
  middle_block.0 / .1 / .2                   mid_block.resnets.0 / attentions.0 / resnets.1
  output_blocks.{k}.0 / .1                   up_blocks.{i}.resnets.{j} / attentions.{j}
  output_blocks.{k}.{1|2}.conv               up_blocks.{i}.upsamplers.0.conv
  time_embed.0 / .2, out.0 / .2              time_embedding.linear_1 / 2, conv_norm_out / conv_out
  resnet: in_layers.0 / .2, emb_layers.1,    norm1 / conv1, time_emb_proj,
          out_layers.0 / .3, skip_connection norm2 / conv2, conv_shortcut

  LDM VAE                                    diffusers
  {enc}.down.{i}.block.{j}, .downsample.conv encoder.down_blocks.{i}.resnets.{j}, downsamplers.0.conv
  decoder.up.{i}.block.{j}, .upsample.conv   decoder.up_blocks.{n-1-i}...  (LDM counts from the top)
  mid.block_1 / attn_1 / block_2, norm_out  mid_block.resnets.0 / attentions.0 / resnets.1, conv_norm_out
  resnet nin_shortcut; attention norm, q,    conv_shortcut; group_norm, to_q, to_k, to_v,
  k, v, proj_out (1x1 convolutions)          to_out.0 (linear: [C, C, 1, 1] -> [C, C])
"""

from typing import Mapping

import numpy as np

from fdistill_jax.loaders.errors import ConversionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# Non-network entries of LDM checkpoints (the DDPM schedule and EMA bookkeeping).
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "model_ema.decay", "model_ema.num_updates"})
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}


def unet_module_map(unet) -> dict:
  """{LDM module prefix: (diffusers module prefix, inner renames)} for a UNet2DConditionModel."""
  n, layers = len(unet.block_out_channels), unet.layers_per_block
  m = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
       "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
       "middle_block.2": "mid_block.resnets.1"}
  k = 1
  for i, kind in enumerate(unet.down_block_types):
    for j in range(layers):
      m[f"input_blocks.{k}.0"] = f"down_blocks.{i}.resnets.{j}"
      if kind.startswith("CrossAttn"):
        m[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
      k += 1
    if i < n - 1:
      m[f"input_blocks.{k}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
      k += 1
  for i, kind in enumerate(unet.up_block_types):
    attn = kind.startswith("CrossAttn")
    for j in range(layers + 1):
      k = i * (layers + 1) + j
      m[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
      if attn:
        m[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
      if j == layers and i < n - 1:
        m[f"output_blocks.{k}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
  return {ldm: (ours, _UNET_RESNET if ".resnets." in ours else {}) for ldm, ours in m.items()}


def vae_module_map(vae) -> dict:
  """{LDM module prefix: (diffusers module prefix, inner renames)} for an AutoencoderKL."""
  n, layers = len(vae.block_out_channels), vae.layers_per_block
  m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
  for part in ("encoder", "decoder"):
    m.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
              f"{part}.norm_out": f"{part}.conv_norm_out",
              f"{part}.mid.block_1": f"{part}.mid_block.resnets.0",
              f"{part}.mid.attn_1": f"{part}.mid_block.attentions.0",
              f"{part}.mid.block_2": f"{part}.mid_block.resnets.1"})
  for i in range(n):
    for j in range(layers):
      m[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
    if i < n - 1:
      m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    for j in range(layers + 1):
      m[f"decoder.up.{i}.block.{j}"] = f"decoder.up_blocks.{n - 1 - i}.resnets.{j}"
    if i > 0:
      m[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"
  inner = lambda ours: (_VAE_ATTENTION if ".attentions." in ours else
                        _VAE_RESNET if ".resnets." in ours else {})
  return {ldm: (ours, inner(ours)) for ldm, ours in m.items()}


def _rename(key: str, module_map: Mapping[str, tuple], what: str) -> str:
  parts = key.split(".")
  for cut in range(len(parts) - 1, 0, -1):
    prefix = ".".join(parts[:cut])
    if prefix in module_map:
      ours, inner = module_map[prefix]
      rest = ".".join(parts[cut:])
      for old, new in inner.items():
        if rest.startswith(old + "."):
          rest = new + rest[len(old):]
          break
      return f"{ours}.{rest}"
  raise ConversionError(f"single-file checkpoint: {what} key {key!r} matches no module of the "
                        "configured architecture; check the configs given with the checkpoint.")


def _vae_value(key: str, value: np.ndarray) -> np.ndarray:
  """LDM's VAE attention uses 1x1 convolutions where diffusers has linear layers."""
  if ".attentions." in key and key.endswith(".weight") and value.ndim == 4:
    return value.reshape(value.shape[:2])
  return value


def _text_key(rest: str) -> str:
  return rest if rest.startswith("text_model.") else "text_model." + rest


def _ema_key(unet_key: str) -> str:
  return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")


def split_checkpoint(state_dict: Mapping[str, np.ndarray], unet, vae, ema: bool = False) -> dict:
  """{'unet', 'vae', 'text_encoder'}: diffusers-named state dicts from an LDM checkpoint.

  Args:
    state_dict: the checkpoint's flat state dict (`state_dict` of a `.ckpt`).
    unet, vae: the modules the weights are for (their configs fix the map).
    ema: take the U-Net from the `model_ema.` copies (non-pruned files).

  Raises:
    ConversionError: an entry belongs to no known part, or EMA weights are missing.
  """
  unet_map, vae_map = unet_module_map(unet), vae_module_map(vae)
  out = {"unet": {}, "vae": {}, "text_encoder": {}}
  unknown = []
  for key, value in state_dict.items():
    if key.startswith(UNET_PREFIX):
      rest = key[len(UNET_PREFIX):]
      if ema:
        if _ema_key(rest) not in state_dict:
          raise ConversionError(f"single-file checkpoint: ema=True but {_ema_key(rest)} (EMA "
                                f"copy of {key}) is missing; load with ema=False.")
        value = state_dict[_ema_key(rest)]
      out["unet"][_rename(rest, unet_map, "U-Net")] = value
    elif key.startswith(VAE_PREFIX):
      name = _rename(key[len(VAE_PREFIX):], vae_map, "VAE")
      out["vae"][name] = _vae_value(name, np.asarray(value))
    elif key.startswith(TEXT_PREFIX):
      out["text_encoder"][_text_key(key[len(TEXT_PREFIX):])] = value
    elif key not in SCHEDULE_BUFFERS and not key.startswith("model_ema."):
      unknown.append(key)
  if unknown:
    raise ConversionError(f"single-file checkpoint has {len(unknown)} entries outside the U-Net, "
                          f"VAE and text encoder: {unknown[:8]}; is it a Stable Diffusion 1.x/2.x "
                          "checkpoint?")
  return out
