"""Stable Diffusion XL in Flax: loading a diffusers SDXL folder and encoding prompts.

  pipe = sdxl.load_pipeline("stable-diffusion-xl-base-1.0")
  cond = pipe.encode_prompts(["a photo of a cat"])   # {'context': [N, 77, 2048], 'pooled': [N, 1280]}
  cond["time_ids"] = pipe.time_ids(N, 1024, 1024)     # [N, 6]
  uncond = {**pipe.unconditional(1), "time_ids": pipe.time_ids(1, 1024, 1024)}
  denoise = sd.cfg_denoiser(pipe.denoiser(), uncond, 8.0)   # D(x, sigma, cond), sigma space

An SDXL folder is the SD layout plus a second text encoder and tokenizer:
`unet/`, `text_encoder/` (CLIP ViT-L's text tower, `CLIPTextModel`),
`text_encoder_2/` (OpenCLIP ViT-bigG's text tower in transformers' form,
`CLIPTextModelWithProjection`, `hidden_act="gelu"`), `tokenizer/`,
`tokenizer_2/` (pads with "!", id 0), `vae/` (the same AutoencoderKL;
`scaling_factor` 0.13025 from its config), `scheduler/`, and optionally
`model_index.json` (its `force_zeros_for_empty_prompt`, True for SDXL base).

Prompt encoding follows diffusers' `StableDiffusionXLPipeline.encode_prompt`
(0.42, `clip_skip=None`): each encoder's PENULTIMATE hidden state
(`hidden_states[-2]`, before the last layer and without the final layer
norm), concatenated on the channel axis (768 + 1280 = 2048), and the pooled
`text_embeds` of the second encoder (its end-token state through
`text_projection`). The unconditional embedding for classifier-free guidance
is all zeros, context and pooled, when `force_zeros_for_empty_prompt` (diffusers
does so when no negative prompt is given), else the empty prompt's.

`time_ids` are SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2):
original size (h, w), crop top-left (top, left), target size (h, w) in pixels;
for plain generation diffusers uses (H, W, 0, 0, H, W).

Nothing in a file is executed; errors are `ConversionError`s naming the file.
"""

import dataclasses
import pathlib
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from fdistill_jax.models import sd as sd_nets
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.pipelines import denoisers as denoiser
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.loaders.errors import ConversionError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
WEIGHT_STEMS = {**pipeline.WEIGHT_STEMS, "text_encoder_2": ("model", "pytorch_model")}
PENULTIMATE = -2  # hidden_states index SDXL conditions on (diffusers, clip_skip=None).


def is_sdxl_folder(path) -> bool:
  """True for a diffusers folder with a second text encoder (the SDXL layout)."""
  return (pathlib.Path(path) / "text_encoder_2" / "config.json").is_file()


def read_configs(folder) -> dict:
  """SD's config dicts (`pipeline.read_configs`) + 'text_encoder_2' + 'model_index' ({} if absent)."""
  folder = pathlib.Path(folder)
  cfgs = pipeline.read_configs(folder)
  cfgs["text_encoder_2"] = pipeline.read_json(folder / "text_encoder_2" / "config.json")
  index = folder / "model_index.json"
  cfgs["model_index"] = pipeline.read_json(index) if index.is_file() else {}
  return cfgs


def _check_widths(unet, text, text_2, what="SDXL folder"):
  """The U-Net's cross-attention and added-embedding widths must fit the two encoders."""
  if unet.addition_embed_type != "text_time":
    raise ConversionError(f"{what}: unet/config.json has addition_embed_type="
                          f"{unet.addition_embed_type!r}; SDXL's U-Net has 'text_time'.")
  width = text.text_model.hidden_size + text_2.text_model.hidden_size
  if unet.cross_attention_dim != width:
    raise ConversionError(f"{what}: the U-Net's cross_attention_dim is {unet.cross_attention_dim} "
                          f"but the two text encoders' hidden sizes add up to {width}.")
  added = text_2.projection_dim + 6 * unet.addition_time_embed_dim
  if unet.projection_class_embeddings_input_dim != added:
    raise ConversionError(
        f"{what}: the U-Net's projection_class_embeddings_input_dim is "
        f"{unet.projection_class_embeddings_input_dim} but text_encoder_2's projection_dim + 6 x "
        f"addition_time_embed_dim is {added}: the components do not belong together.")


def build_modules(cfgs, dtype=jnp.float32, remat=False) -> dict:
  """`pipeline.build_modules` + the second text encoder; widths checked."""
  modules = pipeline.build_modules(cfgs, dtype, remat)
  modules["text_encoder_2"] = configs.text_with_projection_from_config(
      cfgs["text_encoder_2"], dtype, remat)
  _check_widths(modules["unet"], modules["text_encoder"], modules["text_encoder_2"])
  modules["force_zeros_for_empty_prompt"] = bool(
      cfgs.get("model_index", {}).get("force_zeros_for_empty_prompt", True))
  return modules


def time_ids(batch: int, height: int, width: int, crop=(0, 0), original=None) -> np.ndarray:
  """[batch, 6] float32: original (h, w), crop (top, left), target (h, w) in pixels."""
  original = (height, width) if original is None else tuple(original)
  row = np.asarray(original + tuple(crop) + (height, width), np.float32)
  return np.broadcast_to(row, (batch, 6)).copy()


def prompt_embeddings(states, states_2, pooled_2) -> dict:
  """{'context': [N, L, C1 + C2], 'pooled': [N, P]} from both towers' hidden_states and the
  second tower's text_embeds: diffusers' SDXL encode_prompt (module docstring)."""
  context = jnp.concatenate([states[PENULTIMATE], states_2[PENULTIMATE]], axis=-1)
  return {"context": context, "pooled": pooled_2}


def _encode(text_encoder, text_encoder_2, variables, ids, ids_2):
  _, _, states = text_encoder.apply(variables["text_encoder"], ids, True)
  pooled, _, states_2 = text_encoder_2.apply(variables["text_encoder_2"], ids_2, True)
  return prompt_embeddings(states, states_2, pooled)


@dataclasses.dataclass
class SDXLPipeline(pipeline.Pipeline):
  """SDXL's networks, variables, schedule and tokenizers (module docstring).

  `variables` also holds 'text_encoder_2'; `text_encoder` is the CLIP-L tower.
  """
  text_encoder_2: Optional[sd_nets.CLIPTextModelWithProjection] = None
  tokenizer_2: Optional[Any] = None
  force_zeros_for_empty_prompt: bool = True

  def tokenize(self, prompts):
    """Both tokenizers' ids: ([N, 77], [N, 77]) int32."""
    if self.tokenizer is None or self.tokenizer_2 is None:
      raise ValueError("this SDXL pipeline lacks tokenizer/ or tokenizer_2/: prompts cannot be "
                       "encoded; load a folder that has both.")
    return self.tokenizer(prompts), self.tokenizer_2(prompts)

  def encode_prompts(self, prompts) -> dict:
    """Prompts -> {'context': [N, 77, C1 + C2], 'pooled': [N, P]}, float32."""
    ids, ids_2 = self.tokenize(prompts)
    fn = self._jit("sdxl_text", lambda v, a, b: _encode(self.text_encoder, self.text_encoder_2,
                                                         v, a, b))
    return fn(self.variables, jnp.asarray(ids), jnp.asarray(ids_2))

  def unconditional(self, n: int = 1) -> dict:
    """The CFG negative: zeros (force_zeros_for_empty_prompt) or the empty prompt's encoding."""
    if not self.force_zeros_for_empty_prompt:
      return self.encode_prompts([""] * n)
    t1, t2 = self.text_encoder.text_model, self.text_encoder_2
    length = t1.max_position_embeddings
    return {"context": jnp.zeros((n, length, t1.hidden_size + t2.text_model.hidden_size)),
            "pooled": jnp.zeros((n, t2.projection_dim))}

  def time_ids(self, batch: int, height: int, width: int, **kwargs) -> np.ndarray:
    """SDXL micro-conditioning for `batch` images of height x width pixels (`time_ids`)."""
    return time_ids(batch, height, width, **kwargs)

  def denoiser(self, timestep: str = "interpolate"):
    """D(x, sigma, cond), cond = {'context', 'pooled', 'time_ids'} (`unet_denoiser`)."""
    return unet_denoiser(self.unet, self.variables["unet"], self.schedule, timestep)


def unet_denoiser(unet, unet_variables, schedule, timestep="interpolate"):
  """D(x, sigma, cond) of SDXL's U-Net (`fdistill_jax.pipelines.denoisers.eps_denoiser`).

  cond = {'context': [B, L, C], 'pooled': [B, P], 'time_ids': [B, 6]}: a pytree,
  which `denoiser.cfg_denoiser` pairs leaf by leaf with the unconditional one.
  """
  def eps_fn(z, t, cond):
    return unet.apply(unet_variables, z, t, cond["context"], text_embeds=cond["pooled"],
                      time_ids=cond["time_ids"])
  return denoiser.eps_denoiser(eps_fn, schedule, timestep)


def load_pipeline(folder, *, dtype=jnp.float32, remat=False, variant=None) -> SDXLPipeline:
  """Loads a diffusers SDXL folder (module docstring); everything is checked before returning.

  Args:
    folder: the model folder (stable-diffusion-xl-base-1.0's layout).
    dtype: compute dtype (parameters stay float32). SDXL's VAE overflows in
      float16 (its config says `force_upcast`); bfloat16 keeps float32's range.
    remat: `nn.remat` on every resnet, transformer block and CLIP layer.
    variant: weight-file variant, e.g. 'fp16' (`diffusion_pytorch_model.fp16.safetensors`).
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder: SDXL loads from a diffusers model folder.")
  if not is_sdxl_folder(folder):
    raise ConversionError(f"{folder} has no text_encoder_2/config.json: not an SDXL folder "
                          "(load SD 1.x/2.x folders with fdistill_jax.pipelines.sd.load_pipeline).")
  modules = build_modules(read_configs(folder), dtype, remat)
  variables = pipeline.folder_variables(folder, modules, variant, COMPONENTS, WEIGHT_STEMS)
  tok = pipeline._tokenizer(folder / "tokenizer", modules["text_encoder"])  # pylint: disable=protected-access
  tok_2 = pipeline._tokenizer(folder / "tokenizer_2", modules["text_encoder_2"])  # pylint: disable=protected-access
  return SDXLPipeline(modules["unet"], modules["text_encoder"], modules["vae"], variables,
                      modules["schedule"], modules["scaling_factor"], modules["shift_factor"],
                      tok, text_encoder_2=modules["text_encoder_2"], tokenizer_2=tok_2,
                      force_zeros_for_empty_prompt=modules["force_zeros_for_empty_prompt"])
