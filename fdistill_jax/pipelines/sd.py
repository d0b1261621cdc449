"""Loading Stable Diffusion into Flax: model folders and single-file checkpoints.

  pipe = load_pipeline("stable-diffusion-v1-5")          # diffusers folder
  pipe = load_pipeline("v1-5-pruned-emaonly.safetensors", tokenizer_dir=".../tokenizer")
  context = pipe.encode_prompts(["a photo of a cat", ""])  # [2, 77, 768]
  denoise = pipe.denoiser()                                 # D(x, sigma, context)
  images = pipe.decode(latents)                             # [-1, 1], NHWC

A diffusers folder has `unet/`, `text_encoder/`, `vae/` (config.json plus
weights: `.safetensors` preferred, `.bin` read by the allow-list unpickler,
optionally sharded or with a `variant` such as fp16), `scheduler/` and
`tokenizer/`. The architecture comes from the config.json files
(`fdistill_jax.loaders.sd_configs`); single-file LDM checkpoints carry none, so they
use `config_dir` (a diffusers folder without weights, e.g. the SD 1.5 configs)
or the built-in SD 1.5 configs. Nothing in a file is executed. Everything is
read and checked before a `Pipeline` is returned; a bad file raises a
`ConversionError` naming it and the key, and nothing is written anywhere.

Latent scaling: the U-Net works on `scaling_factor * (z - shift_factor)`
where z is the VAE's latent (SD 1.5: 0.18215 and 0).
"""

import dataclasses
import json
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from fdistill_jax.loaders.errors import ConversionError
from fdistill_jax.models import sd as sd_nets
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.pipelines import denoisers as denoiser
from fdistill_jax.loaders import ldm
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.loaders import state_dict as weights

COMPONENTS = ("unet", "text_encoder", "vae")
WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text_encoder": ("model", "pytorch_model")}
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                "text_encoder": "text_encoder/config.json",
                "scheduler": "scheduler/scheduler_config.json"}


def read_json(path) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: a diffusers model folder needs "
                            f"{sorted(CONFIG_FILES.values())}.")
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ConversionError(f"{path} must hold a JSON object.")
  return value


def read_configs(folder) -> dict:
  """{'unet', 'vae', 'text_encoder', 'scheduler'} config dicts of a diffusers folder."""
  return {name: read_json(pathlib.Path(folder) / rel) for name, rel in CONFIG_FILES.items()}


def build_modules(cfgs, dtype=jnp.float32, remat=False) -> dict:
  """Flax modules and the schedule from config dicts (`read_configs` or `SD15_CONFIGS`)."""
  vae, scale, shift = configs.vae_from_config(cfgs["vae"], dtype, remat)
  return {"unet": configs.unet_from_config(cfgs["unet"], dtype, remat),
          "text_encoder": configs.text_from_config(cfgs["text_encoder"], dtype, remat),
          "vae": vae, "scaling_factor": scale, "shift_factor": shift,
          "schedule": denoiser.DiscreteSchedule.from_config(cfgs["scheduler"])}


@dataclasses.dataclass
class Pipeline:
  """Stable Diffusion's networks, their variables and schedule (see the module docstring)."""
  unet: sd_nets.UNet2DConditionModel
  text_encoder: sd_nets.CLIPTextModel
  vae: sd_nets.AutoencoderKL
  variables: dict  # {'unet': {'params': ...}, 'text_encoder': ..., 'vae': ...}
  schedule: denoiser.DiscreteSchedule
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  tokenizer: Optional[Any] = None
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def _jit(self, name, fn):
    if name not in self._jitted:
      self._jitted[name] = jax.jit(fn)
    return self._jitted[name]

  def tokenize(self, prompts):
    if self.tokenizer is None:
      raise ValueError("this pipeline has no tokenizer: load a folder with tokenizer/ or pass "
                       "tokenizer_dir to load_pipeline.")
    return self.tokenizer(prompts)

  def encode_prompts(self, prompts):
    """Prompts -> the text encoder's last hidden state [N, 77, C], float32."""
    fn = self._jit("text", lambda v, ids: self.text_encoder.apply(v, ids)[0])
    return fn(self.variables["text_encoder"], jnp.asarray(self.tokenize(prompts)))

  def denoiser(self, timestep: str = "interpolate"):
    """D(x, sigma, context) of the U-Net (`fdistill_jax.pipelines.denoisers`)."""
    return denoiser.unet_denoiser(self.unet, self.variables["unet"], self.schedule, timestep)

  def decode(self, latents, variables=None):
    """U-Net latents -> images in about [-1, 1] (NHWC, float32). Traceable."""
    z = to_vae_latents(latents, self.scaling_factor, self.shift_factor)
    return self.vae.apply(variables or self.variables["vae"], z, method="decode")

  def encode(self, images, rng=None, variables=None):
    """Images in [-1, 1] -> U-Net latents: the posterior mean, or a sample when `rng` is given."""
    mean, logvar = self.vae.apply(variables or self.variables["vae"], images, method="encode")
    z = mean if rng is None else sd_nets.sample_latent(rng, mean, logvar)
    return to_unet_latents(z, self.scaling_factor, self.shift_factor)


def to_unet_latents(z, scaling_factor, shift_factor):
  """VAE latents z -> the U-Net's latents (z - shift) * scale (SD 1.5: 0.18215, 0)."""
  return (z - shift_factor) * scaling_factor


def to_vae_latents(x, scaling_factor, shift_factor):
  """The U-Net's latents -> VAE latents x / scale + shift (inverse of `to_unet_latents`)."""
  return jnp.asarray(x, jnp.float32) / scaling_factor + shift_factor


def folder_variables(folder, modules, variant, components=COMPONENTS,
                     stems=WEIGHT_STEMS) -> dict:
  """{component: variables} read from a diffusers folder's component subfolders."""
  out = {}
  for name in components:
    state_dict, path = weights.read_component(folder / name, stems[name], variant)
    out[name] = names.variables_from_state_dict(modules[name], state_dict, f"{name} ({path})")
  return out


def _checkpoint_variables(path, modules, ema) -> dict:
  parts = ldm.split_checkpoint(weights.read_state_dict(path), modules["unet"], modules["vae"], ema)
  return {name: names.variables_from_state_dict(modules[name], parts[name], f"{name} ({path})")
          for name in COMPONENTS}


def _tokenizer(folder, text_encoder):
  if folder is None or not pathlib.Path(folder).is_dir():
    return None
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer(folder, text_encoder.text_model.max_position_embeddings)


def load_pipeline(path, *, dtype=jnp.float32, remat=False, variant=None, config_dir=None,
                  tokenizer_dir=None, ema=False) -> Pipeline:
  """Loads a diffusers folder or a single-file LDM checkpoint (module docstring).

  Args:
    path: a diffusers model folder, or a `.safetensors` / `.ckpt` single file.
    dtype: compute dtype of the networks (parameters stay float32).
    remat: `nn.remat` on every resnet and transformer block.
    variant: weight-file variant of a folder (e.g. 'fp16': `model.fp16.safetensors`).
    config_dir: for single files, a diffusers folder whose config.json files
      describe the checkpoint (default: the built-in SD 1.5 configs).
    tokenizer_dir: tokenizer folder (default: `tokenizer/` of the folder or
      of `config_dir`); without one, prompts cannot be encoded.
    ema: single files only: take the U-Net's `model_ema.` weights.
  """
  path = pathlib.Path(path)
  if (path / "text_encoder_2").is_dir():
    raise ConversionError(f"{path} is an SDXL folder (it has text_encoder_2/): load it with "
                          "fdistill_jax.pipelines.sdxl.load_pipeline.")
  if path.is_dir():
    cfgs, source = read_configs(path), path
  elif path.is_file():
    cfgs = read_configs(config_dir) if config_dir else configs.SD15_CONFIGS
    source = pathlib.Path(config_dir) if config_dir else None
  else:
    raise FileNotFoundError(f"{path} is neither a diffusers model folder nor a checkpoint file.")
  modules = build_modules(cfgs, dtype, remat)
  if path.is_dir():
    variables = folder_variables(path, modules, variant)
  else:
    variables = _checkpoint_variables(path, modules, ema)
  tok_dir = tokenizer_dir or (source / "tokenizer" if source else None)
  return Pipeline(modules["unet"], modules["text_encoder"], modules["vae"], variables,
                  modules["schedule"], modules["scaling_factor"], modules["shift_factor"],
                  _tokenizer(tok_dir, modules["text_encoder"]))
