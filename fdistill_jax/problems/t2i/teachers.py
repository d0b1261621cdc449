"""Stable Diffusion teachers of the registry: `teacher.kind='sd15'` and `'sd15_random'`.

  sd15         a diffusers model folder (or a single-file checkpoint) at
               `teacher.path`, read by `fdistill_jax.pipelines.sd.load_pipeline`
               (nothing in a file is executed); the tokenizer from its
               `tokenizer/` or `teacher.tokenizer`.
  sd15_random  the architecture of `teacher.arch` ({'unet', 'text_encoder',
               'vae'}: diffusers / transformers config.json dicts) with random
               weights and SD 1.5's scheduler; tokenizer from `teacher.tokenizer`.
               For tests and smoke runs.

SDXL's kinds (`sdxl_teacher`) go through the same functions. Every kind builds
a `fdistill_jax.pipelines.sd.Pipeline` first; the teacher is the pipeline's own
module (`pipe.module`, a `LatentDenoiser` with the U-Net, text towers and VAE) and
variables (`pipe.params`), and the conditioning is `distill.text_conditioning(pipe)`.
Generator and fake score are the U-Net alone (parameters {'unet': ...}), in
latents of data.resolution / 8 (the VAE's factor). Discriminator heads read the
teacher U-Net's features at `disc.resolutions` (latent heights; 0 = mid block).
"""

import os

import jax.numpy as jnp

from fdistill_jax.io import limits
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.loaders import sd_configs
from fdistill_jax.loaders import tokenizer as sd_tokenizer
from fdistill_jax.pipelines import sd as sd_pipeline
from fdistill_jax.problems.t2i import distill
from fdistill_jax.train import teacher as base

PARTS = {"sd15": ("unet", "text_encoder", "vae"),
         "sdxl": ("unet", "text_encoder", "text_encoder_2", "vae")}
_FOLDERS = {"sd15": "SD15_FOLDER (a diffusers model folder with unet/, text_encoder/, vae/, "
                    "scheduler/, tokenizer/)",
            "sdxl": "SDXL_FOLDER (a diffusers folder with unet/, text_encoder/, text_encoder_2/, "
                    "tokenizer/, tokenizer_2/, vae/, scheduler/)"}
_CONFIGS = {"sd15": "configs/sd15.py:tiny", "sdxl": "configs/sdxl.py:tiny"}


def latent_shape(pipe, config) -> tuple:
  """(data.resolution, the U-Net's latent shape (h, w, C)) of the VAE's downsampling."""
  factor = sd_pipeline.vae_factor(pipe.vae)
  res = int(config.data.resolution)
  if res % factor:
    raise ValueError(f"data.resolution={res} is not a multiple of the VAE's factor {factor}.")
  return res, (res // factor, res // factor, pipe.unet.in_channels)


def pipeline_teacher(kind, pipe: sd_pipeline.Pipeline, config, unet_config,
                     identity) -> base.Teacher:
  """The Teacher record of an SD-family pipeline (`kind`: the generator spec's, 'sd15' or
  'sdxl'): the teacher is `pipe.module`; generator and fake score its U-Net alone."""
  text = pipe.text_encoder.text_model
  if not pipe.is_sdxl and text.hidden_size != pipe.unet.cross_attention_dim:
    raise ValueError(f"text tower width {text.hidden_size} != the U-Net's cross_attention_dim "
                     f"{pipe.unet.cross_attention_dim}.")
  res, shape = latent_shape(pipe, config)
  conditioning = distill.text_conditioning(pipe, res)
  teacher, variables = pipe.module, pipe.params["params"]
  spec = {"kind": kind, "unet": dict(unet_config), "sample_shape": list(shape),
          "sigmas": list(teacher.sigmas)}
  return base.Teacher(module=teacher, variables={"params": variables},
                      student=sd_pipeline.LatentDenoiser(teacher.unet, teacher.sigmas),
                      student_params={"unet": variables["unet"]}, sample_shape=shape,
                      num_classes=0, spec=spec, identity=identity, conditioning=conditioning)


def folder_teacher(config, kind) -> base.Teacher:
  """`teacher.kind` 'sd15' or 'sdxl': a diffusers folder (SD 1.x also a single file)."""
  path = config.teacher.path
  if not path:
    raise ValueError(f"teacher.kind={kind!r} needs --config.teacher.path={_FOLDERS[kind]}.")
  tokenizer_dir = (config.teacher.get("tokenizer") or None) if kind == "sd15" else None
  pipe = sd_pipeline.load_pipeline(path, dtype=base.compute_dtype(config),
                                   remat=bool(config.teacher.get("remat", False)),
                                   tokenizer_dir=tokenizer_dir, attention=base.attention(config))
  if pipe.is_sdxl != (kind == "sdxl"):
    raise ValueError(f"teacher.kind={kind!r} but {path} is "
                     f"{'an SDXL' if pipe.is_sdxl else 'an SD 1.x'} model: set teacher.kind="
                     f"{'sdxl' if pipe.is_sdxl else 'sd15'!r}.")
  cfgs = sd_pipeline.read_configs(path) if os.path.isdir(path) else sd_configs.SD15_CONFIGS
  identity = {"kind": kind, "path": os.path.abspath(path), "unet": cfgs["unet"]}
  return pipeline_teacher(kind, pipe, config, cfgs["unet"], identity)


def random_pipeline_teacher(config, kind) -> base.Teacher:
  """`teacher.kind` 'sd15_random' or 'sdxl_random': `teacher.arch`'s networks, random weights."""
  refuse_path(config, kind)
  parts = PARTS[kind]
  arch = config.teacher.arch.to_dict()
  missing = [k for k in parts if k not in arch]
  if missing:
    raise ValueError(f"teacher.kind='{kind}_random' needs teacher.arch.{missing[0]} (a "
                     f"config.json dict); see {_CONFIGS[kind]}.")
  cfgs = {**arch, "scheduler": sd_configs.SD15_CONFIGS["scheduler"]}
  modules = sd_pipeline.build_modules(cfgs, base.compute_dtype(config),
                                      bool(config.teacher.get("remat", False)),
                                      base.attention(config))
  variables = {k: names.random_variables(modules[k], seed=config.seed + 1 + i)
               for i, k in enumerate(parts)}
  tokenizers = []
  for key, tower in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))[
      :len(parts) - 2]:
    folder = config.teacher.get(key, "")
    if not folder:
      raise ValueError(f"teacher.kind='{kind}_random' needs --config.teacher.{key}=FOLDER "
                       f"({TOKENIZER_HINT}).")
    length = modules[tower].text_model.max_position_embeddings
    tokenizers.append(sd_tokenizer.CLIPTokenizer(
        folder, length, vocab_size=modules[tower].text_model.vocab_size))
  pipe = sd_pipeline.Pipeline.from_modules(modules, variables, *tokenizers)
  identity = {"kind": f"{kind}_random", "arch": arch, "seed": config.seed + 1}
  return pipeline_teacher(kind, pipe, config, arch["unet"], identity)


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='sd15'`: SD 1.x from a diffusers folder or single-file checkpoint."""
  return folder_teacher(config, "sd15")


TOKENIZER_HINT = ("a CLIP tokenizer folder: tokenizer.json, or vocab.json + merges.txt, e.g. "
                  "the tokenizer/ folder of stable-diffusion-v1-5")


def refuse_path(config, real_kind):
  """The '_random' kinds draw their networks and read no weights: a teacher.path is refused
  (it would be silently ignored), naming the kind that reads it."""
  if config.teacher.get("path"):
    raise ValueError(
        f"teacher.kind={config.teacher.kind!r} (the 'tiny' variant) draws random networks and "
        f"reads no --config.teacher.path={config.teacher.path}; to distil your own model "
        f"folder, add --config.teacher.kind={real_kind}.")


def random_teacher(config) -> base.Teacher:
  """`teacher.kind='sd15_random'`: `teacher.arch`'s SD networks with random weights."""
  return random_pipeline_teacher(config, "sd15")


def student_from_spec(spec, dtype=jnp.float32):
  """(LatentDenoiser U-Net, latent shape, 0) from a generator spec of kind 'sd15' or 'sdxl'."""
  for key in ("unet", "sample_shape", "sigmas"):
    if key not in spec:
      raise ValueError(f"The {spec.get('kind', 'sd15')} generator spec has no {key!r}.")
  what = f"the {spec.get('kind', 'sd15')} generator spec (generator_spec.json)"
  shape = spec["sample_shape"]
  if not (isinstance(shape, list) and len(shape) == 3):
    raise ValueError(f"{what}: 'sample_shape' is {str(shape)[:80]}; expected [height, width, "
                     "channels] of the latent.")
  shape = tuple(limits.spec_int({"sample_shape": d}, "sample_shape", 1, MAX_LATENT_SIDE, what)
                for d in shape)
  sigmas = limits.spec_floats(spec, "sigmas", MAX_TIMESTEPS, what)
  unet = sd_configs.unet_from_config(spec["unet"], dtype)
  return sd_pipeline.LatentDenoiser(unet, sigmas), shape, 0


MAX_LATENT_SIDE = 1024                 # latent pixels per side (SDXL at 1024^2: 128)
MAX_TIMESTEPS = 100_000                # entries of the DDPM sigma table (SD: 1,000)
