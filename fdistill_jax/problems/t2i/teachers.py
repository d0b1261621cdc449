"""Stable Diffusion teachers of the registry: `teacher.kind='sd15'` and `'sd15_random'`.

  sd15         a diffusers model folder (or a single-file checkpoint) at
               `teacher.path`, read by `fdistill_jax.pipelines.sd.load_pipeline`
               (nothing in a file is executed); the tokenizer from its
               `tokenizer/` or `teacher.tokenizer`.
  sd15_random  the architecture of `teacher.arch` ({'unet', 'text_encoder',
               'vae'}: diffusers / transformers config.json dicts) with random
               weights and SD 1.5's scheduler; tokenizer from `teacher.tokenizer`.
               For tests and smoke runs.

The teacher is `sd.distill.LatentDenoiser` with the U-Net, text tower and VAE;
generator and fake score are the U-Net alone (parameters {'unet': ...}), in
latents of data.resolution / 8 (the VAE's factor). Discriminator heads read the
teacher U-Net's features at `disc.resolutions` (latent heights; 0 = mid block).
"""

import os

import jax.numpy as jnp

from fdistill_jax.loaders import sd_configs
from fdistill_jax.problems.t2i import distill
from fdistill_jax.pipelines import sd as sd_pipeline
from fdistill_jax.loaders import tokenizer as sd_tokenizer
from fdistill_jax.train import teacher as base


def _dtype(config):
  if config.compute_dtype not in base.DTYPES:
    raise ValueError(f"compute_dtype={config.compute_dtype!r}; expected one of "
                     f"{sorted(base.DTYPES)}.")
  return base.DTYPES[config.compute_dtype]


def _sigmas(schedule):
  return tuple(float(s) for s in schedule.sigmas)


def _build(modules, variables, tokenizer, config, unet_config, identity) -> base.Teacher:
  """The Teacher record from built modules, their {'unet', 'text_encoder', 'vae'} params."""
  if tokenizer is None:
    raise ValueError("The SD teacher has no tokenizer: the model folder lacks tokenizer/; set "
                     "--config.teacher.tokenizer=PATH/tokenizer.")
  sigmas = _sigmas(modules["schedule"])
  teacher = distill.LatentDenoiser(
      modules["unet"], sigmas, text_encoder=modules["text_encoder"], vae=modules["vae"],
      scaling_factor=modules["scaling_factor"], shift_factor=modules["shift_factor"])
  res, shape = latent_shape(modules, config)
  unet = modules["unet"]
  text = modules["text_encoder"].text_model
  conditioning = distill.TextConditioning(
      teacher, image_shape=(res, res, 3),
      context_shape=(text.max_position_embeddings, text.hidden_size),
      empty_tokens=tuple(int(t) for t in tokenizer([""])[0]), tokenizer=tokenizer)
  if text.hidden_size != unet.cross_attention_dim:
    raise ValueError(f"text tower width {text.hidden_size} != the U-Net's cross_attention_dim "
                     f"{unet.cross_attention_dim}.")
  return latent_teacher("sd15", teacher, variables, unet_config, shape, identity, conditioning)


def latent_shape(modules, config) -> tuple:
  """(data.resolution, the U-Net's latent shape (h, w, C)) of the VAE's downsampling."""
  factor = distill.vae_factor(modules["vae"])
  res = int(config.data.resolution)
  if res % factor:
    raise ValueError(f"data.resolution={res} is not a multiple of the VAE's factor {factor}.")
  return res, (res // factor, res // factor, modules["unet"].in_channels)


def latent_teacher(kind, teacher, variables, unet_config, shape, identity,
                   conditioning) -> base.Teacher:
  """The Teacher record of an SD-family teacher (`kind`: the generator spec's, 'sd15' or
  'sdxl'): generator and fake score are the teacher's U-Net alone (`LatentDenoiser`)."""
  spec = {"kind": kind, "unet": dict(unet_config), "sample_shape": list(shape),
          "sigmas": list(teacher.sigmas)}
  return base.Teacher(module=teacher, variables={"params": variables},
                      student=distill.LatentDenoiser(teacher.unet, teacher.sigmas),
                      student_params={"unet": variables["unet"]}, sample_shape=shape,
                      num_classes=0, spec=spec, identity=identity, conditioning=conditioning)


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='sd15'`: SD 1.x from a diffusers folder or single-file checkpoint."""
  path = config.teacher.path
  if not path:
    raise ValueError("teacher.kind='sd15' needs --config.teacher.path=SD15_FOLDER (a diffusers "
                     "model folder with unet/, text_encoder/, vae/, scheduler/, tokenizer/).")
  tok_dir = config.teacher.get("tokenizer") or None
  remat = bool(config.teacher.get("remat", False))
  pipe = sd_pipeline.load_pipeline(path, dtype=_dtype(config), remat=remat,
                                   tokenizer_dir=tok_dir, attention=base.attention(config))
  cfgs = (sd_pipeline.read_configs(path) if os.path.isdir(path) else sd_configs.SD15_CONFIGS)
  modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae,
             "schedule": pipe.schedule, "scaling_factor": pipe.scaling_factor,
             "shift_factor": pipe.shift_factor}
  variables = {k: v["params"] for k, v in pipe.variables.items()}
  identity = {"kind": "sd15", "path": os.path.abspath(path), "unet": cfgs["unet"]}
  return _build(modules, variables, pipe.tokenizer, config, cfgs["unet"], identity)


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
  refuse_path(config, "sd15")
  arch = config.teacher.arch.to_dict()
  missing = [k for k in ("unet", "text_encoder", "vae") if k not in arch]
  if missing:
    raise ValueError(f"teacher.kind='sd15_random' needs teacher.arch.{missing[0]} (a "
                     "config.json dict); see configs/sd15.py:tiny.")
  cfgs = {**arch, "scheduler": sd_configs.SD15_CONFIGS["scheduler"]}
  remat = bool(config.teacher.get("remat", False))
  modules = sd_pipeline.build_modules(cfgs, _dtype(config), remat, base.attention(config))
  variables = {k: distill.random_params(modules[k], seed=config.seed + 1 + i)
               for i, k in enumerate(("unet", "text_encoder", "vae"))}
  tok_dir = config.teacher.get("tokenizer", "")
  if not tok_dir:
    raise ValueError("teacher.kind='sd15_random' needs --config.teacher.tokenizer=FOLDER "
                     f"({TOKENIZER_HINT}).")
  tokenizer = sd_tokenizer.CLIPTokenizer(
      tok_dir, modules["text_encoder"].text_model.max_position_embeddings,
      vocab_size=modules["text_encoder"].text_model.vocab_size)
  identity = {"kind": "sd15_random", "arch": arch, "seed": config.seed + 1}
  return _build(modules, variables, tokenizer, config, arch["unet"], identity)


def student_from_spec(spec, dtype=jnp.float32):
  """(LatentDenoiser U-Net, latent shape, 0) from a generator spec of kind 'sd15'."""
  for key in ("unet", "sample_shape", "sigmas"):
    if key not in spec:
      raise ValueError(f"The sd15 generator spec has no {key!r}.")
  unet = sd_configs.unet_from_config(spec["unet"], dtype)
  return distill.LatentDenoiser(unet, tuple(spec["sigmas"])), tuple(spec["sample_shape"]), 0
