"""SDXL teachers of the registry: `teacher.kind='sdxl'` and `'sdxl_random'`.

  sdxl         a diffusers SDXL folder at `teacher.path` (unet/, text_encoder/,
               text_encoder_2/, tokenizer/, tokenizer_2/, vae/, scheduler/),
               read by `fdistill_jax.pipelines.sdxl.load_pipeline` (nothing executed).
  sdxl_random  the architecture of `teacher.arch` ({'unet', 'text_encoder',
               'text_encoder_2', 'vae'}: config.json dicts) with random weights
               and SD's scheduler; tokenizers from `teacher.tokenizer` and
               `teacher.tokenizer_2`. For tests and smoke runs.

The teacher is `sd.sdxl_distill.SDXLLatentDenoiser` (U-Net, both text towers,
VAE); generator and fake score are the U-Net alone (parameters {'unet': ...},
the same `LatentDenoiser` and generator spec layout as SD 1.5's, kind 'sdxl'),
conditioned on the pytree of `SDXLTextConditioning`. Discriminator heads read
the teacher U-Net's features at `disc.resolutions` (latent heights; 0 = mid block).
"""

import os

from fdistill_jax.loaders import sd_configs
from fdistill_jax.problems.t2i import distill
from fdistill_jax.pipelines import sdxl
from fdistill_jax.problems.t2i import sdxl_distill
from fdistill_jax.pipelines import sd as sd_pipeline
from fdistill_jax.loaders import tokenizer as sd_tokenizer
from fdistill_jax.train import teacher as base
from fdistill_jax.problems.t2i import teachers as sd

PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _conditioning(teacher, modules, tokenizers, res, force_zeros):
  tok, tok_2 = tokenizers
  text, text_2 = modules["text_encoder"].text_model, modules["text_encoder_2"]
  return sdxl_distill.SDXLTextConditioning(
      teacher, image_shape=(res, res, 3),
      context_shape=(text.max_position_embeddings,
                     text.hidden_size + text_2.text_model.hidden_size),
      empty_tokens=tuple(int(t) for t in tok([""])[0]), tokenizer=tok,
      pooled_dim=text_2.projection_dim, time_ids=tuple(float(v) for v in sdxl.time_ids(1, res, res)[0]),
      force_zeros=force_zeros, empty_tokens_2=tuple(int(t) for t in tok_2([""])[0]),
      tokenizer_2=tok_2)


def _build(modules, variables, tokenizers, config, unet_config, identity) -> base.Teacher:
  """The Teacher record from built modules and their {'unet', ..., 'vae'} params."""
  if None in tokenizers:
    raise ValueError("The SDXL teacher needs both tokenizers: the model folder lacks "
                     "tokenizer/ or tokenizer_2/.")
  sigmas = sd._sigmas(modules["schedule"])  # pylint: disable=protected-access
  teacher = sdxl_distill.SDXLLatentDenoiser(
      modules["unet"], sigmas, text_encoder=modules["text_encoder"], vae=modules["vae"],
      scaling_factor=modules["scaling_factor"], shift_factor=modules["shift_factor"],
      text_encoder_2=modules["text_encoder_2"])
  res, shape = sd.latent_shape(modules, config)
  conditioning = _conditioning(teacher, modules, tokenizers, res,
                               modules.get("force_zeros_for_empty_prompt", True))
  return sd.latent_teacher("sdxl", teacher, variables, unet_config, shape, identity,
                           conditioning)


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='sdxl'`: SDXL from a diffusers folder."""
  path = config.teacher.path
  if not path:
    raise ValueError("teacher.kind='sdxl' needs --config.teacher.path=SDXL_FOLDER (a diffusers "
                     "folder with unet/, text_encoder/, text_encoder_2/, tokenizer/, "
                     "tokenizer_2/, vae/, scheduler/).")
  pipe = sdxl.load_pipeline(path, dtype=sd._dtype(config),  # pylint: disable=protected-access
                            remat=bool(config.teacher.get("remat", False)),
                            attention=base.attention(config))
  modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
             "text_encoder_2": pipe.text_encoder_2, "vae": pipe.vae, "schedule": pipe.schedule,
             "scaling_factor": pipe.scaling_factor, "shift_factor": pipe.shift_factor,
             "force_zeros_for_empty_prompt": pipe.force_zeros_for_empty_prompt}
  variables = {k: v["params"] for k, v in pipe.variables.items()}
  unet_config = sd_pipeline.read_json(os.path.join(path, "unet", "config.json"))
  identity = {"kind": "sdxl", "path": os.path.abspath(path), "unet": unet_config}
  return _build(modules, variables, (pipe.tokenizer, pipe.tokenizer_2), config, unet_config,
                identity)


def random_teacher(config) -> base.Teacher:
  """`teacher.kind='sdxl_random'`: `teacher.arch`'s SDXL networks with random weights."""
  sd.refuse_path(config, "sdxl")
  arch = config.teacher.arch.to_dict()
  missing = [k for k in PARTS if k not in arch]
  if missing:
    raise ValueError(f"teacher.kind='sdxl_random' needs teacher.arch.{missing[0]} (a "
                     "config.json dict); see configs/sdxl.py:tiny.")
  cfgs = {**arch, "scheduler": sd_configs.SD15_CONFIGS["scheduler"]}
  modules = sdxl.build_modules(cfgs, sd._dtype(config),  # pylint: disable=protected-access
                               bool(config.teacher.get("remat", False)), base.attention(config))
  variables = {k: distill.random_params(modules[k], seed=config.seed + 1 + i)
               for i, k in enumerate(PARTS)}
  tokenizers = []
  for key, tower in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
    folder = config.teacher.get(key, "")
    if not folder:
      raise ValueError(f"teacher.kind='sdxl_random' needs --config.teacher.{key}=FOLDER "
                       f"({sd.TOKENIZER_HINT}).")
    length = modules[tower].text_model.max_position_embeddings
    tokenizers.append(sd_tokenizer.CLIPTokenizer(
        folder, length, vocab_size=modules[tower].text_model.vocab_size))
  identity = {"kind": "sdxl_random", "arch": arch, "seed": config.seed + 1}
  return _build(modules, variables, tuple(tokenizers), config, arch["unet"], identity)
