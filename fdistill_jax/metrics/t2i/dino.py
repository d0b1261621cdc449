r"""In-batch similarity of text-to-image samples: DINO features of images of one prompt.

The paper's Table 8 measures diversity as in-batch similarity with DINO features. The metric
comes from Particle Guidance (Corso et al., 2023; gcorso/particle-guidance
`stable_diffusion/eval_clip_score_particle.py`), whose protocol we follow:

* features: DINO ViT-B/8 (`dino_vitb8`; its transformers copy `facebook/dino-vitb8`, a
  `ViTModel` folder with config.json + weights), the class token of the last layer after the
  final norm, of each image at its own resolution (ToTensor and ImageNet mean/std, no
  resize: the position embeddings are interpolated, `networks.vit`), L2-normalised;
* per prompt, the mean of the off-diagonal entries of the cosine matrix of its K >= 2 images;
  then the mean over prompts. Lower is more diverse.

Deviation: position embeddings are interpolated as transformers' `ViTModel` does (bicubic
to the new grid size), where DINO's hub code passes scale factors with a +0.1 offset;
the two differ slightly off the 224-pixel grid. Which DINO size the paper used is not
stated in the text we follow; any `ViTModel` folder loads.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import console
from fdistill_jax.metrics import fid
from fdistill_jax.models import vit
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.pipelines import sharded
from fdistill_jax.loaders import state_dict as weights

USED, IGNORED = configs.USED, configs.IGNORED
VIT_KEYS = {
    "hidden_size": (768, USED), "num_hidden_layers": (12, USED),
    "num_attention_heads": (12, USED), "intermediate_size": (3072, USED),
    "hidden_act": ("gelu", ("gelu",)), "layer_norm_eps": (1e-12, USED),
    "image_size": (224, USED), "patch_size": (16, USED), "num_channels": (3, USED),
    "qkv_bias": (True, USED),
}


def vit_from_config(config) -> vit.ViTModel:
  """ViTModel from a transformers ViTConfig dict (unknown generic keys skipped)."""
  c = configs.resolve(config, VIT_KEYS, "ViT", strict=False)
  configs.check_vision(c, "ViT")
  if not isinstance(c["qkv_bias"], bool):
    raise configs.ConversionError(f"ViT config: qkv_bias={configs.short_value(c['qkv_bias'])} "
                                  "must be true or false.")
  return vit.ViTModel(**c)


def _flax_names(state_dict) -> dict:
  """transformers ViTModel keys -> `sd.names` keys: `encoder.layer.3.` -> `encoder.layer_3.`,
  no `vit.` prefix, no pooler."""
  out = {}
  for key, value in state_dict.items():
    key = key[4:] if key.startswith("vit.") else key
    if not key.startswith("pooler."):
      out[re.sub(r"^encoder\.layer\.(\d+)\.", r"encoder.layer_\1.", key)] = value
  return out


def load_dino(folder) -> tuple:
  """(ViTModel, variables) of a transformers ViTModel folder (e.g. facebook/dino-vitb8)."""
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"--dino={folder} has no config.json; expected a transformers "
                            "ViTModel folder such as facebook/dino-vitb8.")
  module = vit_from_config(pipeline.read_json(folder / "config.json"))
  state_dict, path = weights.read_component(folder, ("model", "pytorch_model"))
  size = (1, module.image_size, module.image_size, module.num_channels)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(size))["params"]
  variables = names.variables_from_state_dict(module, _flax_names(state_dict),
                                              f"DINO ViT ({path})", shapes=shapes)
  return module, variables


def _features(module, variables, images):
  """L2-normalised class tokens of uint8 NHWC images (ImageNet normalisation inside)."""
  x = (images.astype(jnp.float32) / 255.0 - np.asarray(vit.IMAGENET_MEAN, np.float32)) \
      / np.asarray(vit.IMAGENET_STD, np.float32)
  cls = module.apply(variables, x)[:, 0]
  return cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)


class DinoFeatures:
  """Callable uint8 [B, H, W, 3] -> normalised DINO features [B, D], jitted, batch-sharded
  over a ('data',) mesh of `devices` (default all, `pipelines.sharded`); B a multiple of
  `num_devices`."""

  def __init__(self, folder, devices=None):
    self.module, variables = load_dino(folder)
    self._fn = sharded.ShardedFn(functools.partial(_features, self.module), devices=devices)
    self._variables = self._fn.replicate(variables)
    self.num_devices = self._fn.num_devices

  def __call__(self, images):
    return self._fn(self._variables, images)


NO_GROUPS = ("in-batch similarity needs several images per prompt (e.g. tools.sample_t2i "
             "--num_per_prompt=4); every prompt here has one image.")


def groups_of(prompts) -> list:
  """Index lists of the images sharing a prompt, for prompts with at least two images."""
  by_prompt = {}
  for i, p in enumerate(prompts):
    by_prompt.setdefault(p, []).append(i)
  groups = [g for g in by_prompt.values() if len(g) >= 2]
  if not groups:
    raise ValueError(NO_GROUPS)
  return groups


def in_batch_similarity(features, groups) -> float:
  """Mean over groups of the mean off-diagonal cosine of their (normalised) features."""
  if not groups:
    raise ValueError(NO_GROUPS)
  features = np.asarray(features, np.float64)
  values = []
  for g in groups:
    f = features[g]
    sim = f @ f.T
    values.append((sim.sum() - np.trace(sim)) / (len(g) * (len(g) - 1)))
  return float(np.mean(values))


def similarity_of(images, prompts, feature_fn, batch_size=8) -> float:
  """In-batch similarity of uint8 images generated from `prompts` (one per image)."""
  groups = groups_of(prompts)
  index = sorted(i for g in groups for i in g)
  position = {i: n for n, i in enumerate(index)}
  console.say("In-batch similarity: %d prompts with %d images ...", len(groups), len(index))
  features = fid.extract_features(_Take(images, index), feature_fn, batch_size,
                                  what="DINO features")
  return in_batch_similarity(features, [[position[i] for i in g] for g in groups])


class _Take:
  """images[index[k]] for k in a slice (lazy: the images may be memory-mapped)."""

  def __init__(self, images, index):
    self._images, self._index = images, index

  def __len__(self):
    return len(self._index)

  def __getitem__(self, s):
    return np.stack([np.asarray(self._images[i]) for i in self._index[s]])
