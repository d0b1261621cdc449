r"""Stable Diffusion 1.x and SDXL in Flax: one pipeline, one latent denoiser module.

  pipe = load_pipeline("stable-diffusion-v1-5")          # or an SDXL folder, or a single file
  cond = pipe.encode_prompts(["a photo of a cat"])       # SD: [N, 77, 768]; SDXL: {'context', 'pooled'}
  denoise = pipe.denoiser()                              # D(x, sigma, cond) in sigma space
  images = pipe.decode(latents)                          # [-1, 1], NHWC
  teacher, params = pipe.module, pipe.params             # the same networks as an nn.Module

Object model. `LatentDenoiser` is the one Flax module of a Stable Diffusion
model: the U-Net as D(x; sigma, cond) (`fdistill_jax.pipelines.denoisers.eps_denoiser`),
prompt encoding (`encode_text`, once per family), CFG's unconditional input
(`unconditional`), and the VAE with its latent scaling (`encode_images`,
`decode`). `Pipeline` holds the modules, their variables, the schedule and the
tokenizers, and answers inference calls through that module; the engine
(`fdistill_jax.problems.t2i`) takes `pipe.module` and `pipe.params` as its
teacher, and the one-step generator is `LatentDenoiser(unet, sigmas)`.

Families differ only in data: SDXL has a second text tower and tokenizer
(`text_encoder_2`, `tokenizer_2`), its conditioning is the pytree
{'context', 'pooled', 'time_ids'} instead of SD 1.x's context array, and
`force_zeros_for_empty_prompt` (model_index.json) makes its unconditional input zeros.

Folders. A diffusers folder has `unet/`, `text_encoder/`, `vae/` (config.json
plus weights: `.safetensors` preferred, `.bin` read by the allow-list unpickler,
optionally sharded or with a `variant` such as fp16), `scheduler/` and
`tokenizer/`; SDXL adds `text_encoder_2/` (OpenCLIP bigG's text tower,
`CLIPTextModelWithProjection`), `tokenizer_2/` and `model_index.json`. The
architecture comes from the config.json files (`fdistill_jax.loaders.sd_configs`);
single-file LDM checkpoints (SD 1.x) carry none, so they use `config_dir` or the
built-in SD 1.5 configs. Nothing in a file is executed; a bad file raises a
`ConversionError` naming it and the key.

SDXL prompt encoding follows diffusers' `StableDiffusionXLPipeline.encode_prompt`
(0.42, `clip_skip=None`): each tower's PENULTIMATE hidden state, concatenated on
the channel axis (768 + 1280 = 2048), and the second tower's projected pooled
`text_embeds`. `time_ids` are SDXL's micro-conditioning (Podell et al. 2023,
Sec. 2.2): original (h, w), crop (top, left), target (h, w) in pixels.

Latent scaling: the U-Net works on `scaling_factor * (z - shift_factor)` where
z is the VAE's latent (SD 1.5: 0.18215 and 0; SDXL: 0.13025 and 0).
"""

import dataclasses
import functools
import json
import pathlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.io import limits
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.loaders import ldm
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import state_dict as weights
from fdistill_jax.models import sd as sd_nets
from fdistill_jax.pipelines import denoisers
from fdistill_jax.loaders.errors import ConversionError

COMPONENTS = ("unet", "text_encoder", "vae")
SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text_encoder": ("model", "pytorch_model"),
                "text_encoder_2": ("model", "pytorch_model")}
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                "text_encoder": "text_encoder/config.json",
                "scheduler": "scheduler/scheduler_config.json"}
PENULTIMATE = -2  # hidden_states index SDXL conditions on (diffusers, clip_skip=None).


# ----------------------------------------------------------------------------
# Config files and modules.


def read_json(path) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: a diffusers model folder needs "
                            f"{sorted(CONFIG_FILES.values())}.")
  try:
    value = limits.json_load(path)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  if not isinstance(value, dict):
    raise ConversionError(f"{path} must hold a JSON object.")
  return value


def is_sdxl_folder(path) -> bool:
  """True for a diffusers folder with a second text encoder (the SDXL layout)."""
  return (pathlib.Path(path) / "text_encoder_2" / "config.json").is_file()


def read_configs(folder) -> dict:
  """{'unet', 'vae', 'text_encoder', 'scheduler'} config dicts of a diffusers folder; an SDXL
  folder adds 'text_encoder_2' and 'model_index' ({} if model_index.json is absent)."""
  folder = pathlib.Path(folder)
  cfgs = {name: read_json(folder / rel) for name, rel in CONFIG_FILES.items()}
  if is_sdxl_folder(folder):
    cfgs["text_encoder_2"] = read_json(folder / "text_encoder_2" / "config.json")
    index = folder / "model_index.json"
    cfgs["model_index"] = read_json(index) if index.is_file() else {}
  return cfgs


def _check_sdxl_widths(unet, text, text_2, what="SDXL folder"):
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


def build_modules(cfgs, dtype=jnp.float32, remat=False, attention="xla") -> dict:
  """Flax modules, the schedule and the VAE scaling from config dicts (`read_configs` or
  `SD15_CONFIGS`); with a 'text_encoder_2' config, SDXL's second tower too (widths checked).
  `attention` is the kernel of every network (`fdistill_jax.models.attention`)."""
  vae, scale, shift = configs.vae_from_config(cfgs["vae"], dtype, remat, attention)
  modules = {"unet": configs.unet_from_config(cfgs["unet"], dtype, remat, attention),
             "text_encoder": configs.text_from_config(cfgs["text_encoder"], dtype, remat,
                                                     attention),
             "vae": vae, "scaling_factor": scale, "shift_factor": shift,
             "schedule": denoisers.DiscreteSchedule.from_config(cfgs["scheduler"]),
             "text_encoder_2": None, "force_zeros_for_empty_prompt": False}
  if "text_encoder_2" in cfgs:
    modules["text_encoder_2"] = configs.text_with_projection_from_config(
        cfgs["text_encoder_2"], dtype, remat, attention)
    _check_sdxl_widths(modules["unet"], modules["text_encoder"], modules["text_encoder_2"])
    modules["force_zeros_for_empty_prompt"] = bool(
        cfgs.get("model_index", {}).get("force_zeros_for_empty_prompt", True))
  return modules


def time_ids(batch: int, height: int, width: int, crop=(0, 0), original=None) -> np.ndarray:
  """SDXL's [batch, 6] float32: original (h, w), crop (top, left), target (h, w) in pixels."""
  original = (height, width) if original is None else tuple(original)
  row = np.asarray(original + tuple(crop) + (height, width), np.float32)
  return np.broadcast_to(row, (batch, 6)).copy()


def to_unet_latents(z, scaling_factor, shift_factor):
  """VAE latents z -> the U-Net's latents (z - shift) * scale (SD 1.5: 0.18215, 0)."""
  return (z - shift_factor) * scaling_factor


def to_vae_latents(x, scaling_factor, shift_factor):
  """The U-Net's latents -> VAE latents x / scale + shift (inverse of `to_unet_latents`)."""
  return jnp.asarray(x, jnp.float32) / scaling_factor + shift_factor


def vae_factor(vae) -> int:
  """Image pixels per latent pixel: 2^(number of VAE blocks - 1) (8 for SD)."""
  return 2 ** (len(vae.block_out_channels) - 1)


# ----------------------------------------------------------------------------
# The module.


class LatentDenoiser(nn.Module):
  """D(x; sigma, cond) of a Stable Diffusion U-Net, with its text towers and VAE.

  The engine's denoiser signature (EDMPrecond's): `apply(variables, x, sigma, cond, *,
  train, feature_resolutions)`, variables {'params': {'unet', 'text_encoder',
  ['text_encoder_2',] 'vae'}}; the generator and the fake score carry the U-Net alone.

  Attributes:
    unet: the UNet2DConditionModel.
    sigmas: sigma_t of the discrete schedule, t = 0 .. T-1 (increasing).
    timestep: 'interpolate' or 'nearest' (`fdistill_jax.pipelines.denoisers`).
    text_encoder, vae: the CLIP text tower and the VAE (teacher only).
    scaling_factor, shift_factor: VAE latent z -> U-Net latent (z - shift) * scale.
    text_encoder_2: SDXL's second tower (`CLIPTextModelWithProjection`); None for SD 1.x.
    force_zeros_for_empty_prompt: SDXL's unconditional input is zeros (else the empty prompt's).
  """
  unet: sd_nets.UNet2DConditionModel
  sigmas: tuple
  timestep: str = "interpolate"
  text_encoder: Optional[nn.Module] = None
  vae: Optional[nn.Module] = None
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  text_encoder_2: Optional[nn.Module] = None
  force_zeros_for_empty_prompt: bool = False

  def schedule(self) -> denoisers.DiscreteSchedule:
    sigmas = np.asarray(self.sigmas, np.float64)
    return denoisers.DiscreteSchedule(1.0 / (1.0 + sigmas**2))

  def __call__(self, x, sigma, cond, *, train=False, feature_resolutions=None):
    """Denoised latents (float32), or (denoised, {resolution: U-Net features})."""
    del train                                     # SD's U-Net has no dropout here
    with_features = feature_resolutions is not None

    def eps_fn(z, t, c):
      context, extra = denoisers.unet_inputs(c)
      return self.unet(z, t, context, feature_resolutions=feature_resolutions, **extra)
    denoise = denoisers.eps_denoiser(eps_fn, self.schedule(), self.timestep, has_aux=with_features)
    return denoise(x, sigma, cond)

  def encode_text(self, tokens, tokens_2=None):
    """Token ids [B, L] -> SD 1.x: the tower's last hidden state [B, L, C]; SDXL (both
    tokenizers' ids): {'context': penultimate states concatenated, 'pooled': text_embeds}."""
    if self.text_encoder_2 is None:
      return self.text_encoder(tokens)[0]
    _, _, states = self.text_encoder(tokens, True)
    pooled, _, states_2 = self.text_encoder_2(tokens_2, True)
    context = jnp.concatenate([states[PENULTIMATE], states_2[PENULTIMATE]], axis=-1)
    return {"context": context, "pooled": pooled}

  def unconditional(self, empty_tokens, empty_tokens_2=None):
    """CFG's unconditional text input for one sample (leading axis 1, no time_ids): the
    empty prompt's encoding, or zeros for SDXL's `force_zeros_for_empty_prompt`."""
    if self.text_encoder_2 is None or not self.force_zeros_for_empty_prompt:
      return self.encode_text(empty_tokens, empty_tokens_2)
    width = self.text_encoder.text_model.hidden_size + self.text_encoder_2.text_model.hidden_size
    return {"context": jnp.zeros((1, empty_tokens.shape[-1], width), jnp.float32),
            "pooled": jnp.zeros((1, self.text_encoder_2.projection_dim), jnp.float32)}

  def encode_images(self, images, rng=None):
    """Images [B, H, W, 3] in [-1, 1] -> U-Net latents: a VAE posterior sample, scaled
    (the posterior mean when `rng` is None)."""
    mean, logvar = self.vae.encode(images)
    z = mean if rng is None else sd_nets.sample_latent(rng, mean, logvar)
    return to_unet_latents(z, self.scaling_factor, self.shift_factor)

  def decode(self, latents):
    """U-Net latents [B, h, w, C] -> images in about [-1, 1] [B, H, W, 3], float32."""
    return self.vae.decode(to_vae_latents(latents, self.scaling_factor, self.shift_factor))


# ----------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class Pipeline:
  """Stable Diffusion's networks, variables, schedule and tokenizers (module docstring)."""
  unet: sd_nets.UNet2DConditionModel
  text_encoder: sd_nets.CLIPTextModel
  vae: sd_nets.AutoencoderKL
  variables: dict  # {'unet': {'params': ...}, 'text_encoder': ..., ['text_encoder_2': ...,] 'vae'}
  schedule: denoisers.DiscreteSchedule
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  tokenizer: Optional[Any] = None
  text_encoder_2: Optional[sd_nets.CLIPTextModelWithProjection] = None
  tokenizer_2: Optional[Any] = None
  force_zeros_for_empty_prompt: bool = False
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_modules(cls, modules, variables, tokenizer=None, tokenizer_2=None) -> "Pipeline":
    """From `build_modules`'s dict and {component: {'params': ...}} variables."""
    return cls(modules["unet"], modules["text_encoder"], modules["vae"], variables,
               modules["schedule"], modules["scaling_factor"], modules["shift_factor"], tokenizer,
               modules.get("text_encoder_2"), tokenizer_2,
               bool(modules.get("force_zeros_for_empty_prompt", False)))

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None

  @property
  def components(self) -> tuple:
    return SDXL_COMPONENTS if self.is_sdxl else COMPONENTS

  @functools.cached_property
  def module(self) -> LatentDenoiser:
    """The whole model as one `LatentDenoiser` (the engine's teacher module)."""
    return LatentDenoiser(
        self.unet, tuple(float(s) for s in self.schedule.sigmas), text_encoder=self.text_encoder,
        vae=self.vae, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
        text_encoder_2=self.text_encoder_2,
        force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

  @property
  def params(self) -> dict:
    """`module`'s variables: {'params': {component: params}} (the same arrays as `variables`)."""
    return {"params": {k: v["params"] for k, v in self.variables.items()}}

  def _apply(self, method, *args):
    if method not in self._jitted:
      module = self.module
      self._jitted[method] = jax.jit(lambda v, *a: module.apply(v, *a, method=method))
    return self._jitted[method](self.params, *args)

  def tokenize(self, prompts):
    """Prompts -> token ids [N, L] int32; SDXL: both tokenizers' ([N, L], [N, L])."""
    if self.tokenizer is None or (self.is_sdxl and self.tokenizer_2 is None):
      raise ValueError("this pipeline has no tokenizer (or SDXL's tokenizer_2): load a folder "
                       "with tokenizer/ (and tokenizer_2/) or pass tokenizer_dir to load_pipeline.")
    if self.is_sdxl:
      return self.tokenizer(prompts), self.tokenizer_2(prompts)
    return self.tokenizer(prompts)

  def token_batch(self, prompts) -> dict:
    """{'tokens': ids[, 'tokens_2': ids]} int32: the batch layout of the engine's conditioning."""
    ids = self.tokenize(prompts)
    ids = ids if self.is_sdxl else (ids,)
    return dict(zip(("tokens", "tokens_2"), (np.asarray(i, np.int32) for i in ids)))

  def encode_prompts(self, prompts):
    """Prompts -> SD 1.x: [N, 77, C]; SDXL: {'context': [N, 77, C1 + C2], 'pooled': [N, P]}."""
    return self._apply("encode_text", *map(jnp.asarray, self.token_batch(prompts).values()))

  def unconditional(self, n: int = 1):
    """CFG's negative for n samples (no time_ids): the empty prompt's encoding, or zeros."""
    u = self._apply("unconditional", *map(jnp.asarray, self.token_batch([""]).values()))
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape[1:]), u)

  def time_ids(self, batch: int, height: int, width: int, **kwargs) -> np.ndarray:
    """SDXL micro-conditioning for `batch` images of height x width pixels (`time_ids`)."""
    return time_ids(batch, height, width, **kwargs)

  def denoiser(self, timestep: str = "interpolate"):
    """D(x, sigma, cond) of the U-Net (`fdistill_jax.pipelines.denoisers.unet_denoiser`)."""
    return denoisers.unet_denoiser(self.unet, self.variables["unet"], self.schedule, timestep)

  def decode(self, latents):
    """U-Net latents -> images in about [-1, 1] (NHWC, float32)."""
    return self._apply("decode", latents)

  def encode(self, images, rng=None):
    """Images in [-1, 1] -> U-Net latents: the posterior mean, or a sample when `rng` is given."""
    return self._apply("encode_images", images, rng)


# ----------------------------------------------------------------------------
# Loading.


def folder_variables(folder, modules, variant, components=COMPONENTS) -> dict:
  """{component: variables} read from a diffusers folder's component subfolders."""
  out = {}
  for name in components:
    state_dict, path = weights.read_component(pathlib.Path(folder) / name, WEIGHT_STEMS[name],
                                              variant)
    out[name] = names.variables_from_state_dict(modules[name], state_dict, f"{name} ({path})")
  return out


def _checkpoint_variables(path, modules, ema) -> dict:
  parts = ldm.split_checkpoint(weights.read_state_dict(path), modules["unet"], modules["vae"], ema)
  return {name: names.variables_from_state_dict(modules[name], parts[name], f"{name} ({path})")
          for name in COMPONENTS}


def load_tokenizer(folder, text_encoder):
  """The CLIP tokenizer of `folder` padded to the tower's length, or None without a folder."""
  if folder is None or not pathlib.Path(folder).is_dir():
    return None
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer(folder, text_encoder.text_model.max_position_embeddings,
                       vocab_size=text_encoder.text_model.vocab_size)


def load_pipeline(path, *, dtype=jnp.float32, remat=False, variant=None, config_dir=None,
                  tokenizer_dir=None, ema=False, attention="xla") -> Pipeline:
  """Loads an SD 1.x or SDXL diffusers folder, or a single-file SD 1.x LDM checkpoint.

  Args:
    path: a diffusers model folder, or a `.safetensors` / `.ckpt` single file.
    dtype: compute dtype of the networks (parameters stay float32). SDXL's VAE
      overflows in float16; bfloat16 keeps float32's range.
    remat: `nn.remat` on every resnet, transformer block and CLIP layer.
    variant: weight-file variant of a folder (e.g. 'fp16': `model.fp16.safetensors`).
    config_dir: for single files, a diffusers folder whose config.json files
      describe the checkpoint (default: the built-in SD 1.5 configs).
    tokenizer_dir: tokenizer folder (default: `tokenizer/` of the folder or
      of `config_dir`); without one, prompts cannot be encoded.
    ema: single files only: take the U-Net's `model_ema.` weights.
    attention: the attention kernel (`fdistill_jax.models.attention.SETTINGS`).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    cfgs, source = read_configs(path), path
  elif path.is_file():
    cfgs = read_configs(config_dir) if config_dir else configs.SD15_CONFIGS
    source = pathlib.Path(config_dir) if config_dir else None
    if "text_encoder_2" in cfgs:
      raise ConversionError(f"{path}: single-file checkpoints are read for SD 1.x only; load an "
                            "SDXL model from its diffusers folder.")
  else:
    raise FileNotFoundError(f"{path} is neither a diffusers model folder nor a checkpoint file.")
  modules = build_modules(cfgs, dtype, remat, attention)
  sdxl = modules["text_encoder_2"] is not None
  if path.is_dir():
    variables = folder_variables(path, modules, variant, SDXL_COMPONENTS if sdxl else COMPONENTS)
  else:
    variables = _checkpoint_variables(path, modules, ema)
  tok_dir = tokenizer_dir or (source / "tokenizer" if source else None)
  tok_2 = load_tokenizer(source / "tokenizer_2", modules["text_encoder_2"]) if sdxl else None
  return Pipeline.from_modules(modules, variables, load_tokenizer(tok_dir, modules["text_encoder"]),
                               tok_2)
