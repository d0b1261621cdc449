r"""COCO zero-shot metrics of text-to-image samples: FID and CLIP score (DMD2's protocol).

  metrics = T2IMetrics(ref="coco2014_val_256.npz", inception="pt_inception-2015-12-05.pth",
                       clip="CLIP-ViT-g-14-laion2B-s12B-b42K")   # built once
  metrics(images_uint8, prompts)   # -> {"fid": ..., "clip_score": ..., "clip_score_x100": ...}
  # dino="dino-vitb8" adds "in_batch_similarity" (several images per prompt; sd/dino.py)

Command line: `python -m fdistill_jax.tools.evaluate_t2i` (`tools/evaluate_t2i.py`). The prompts,
the resize protocol and the reference images are described in `fdistill_jax.metrics.t2i.coco`.

FID: Inception-v3 pool features (`eval.fid`, sharded over the devices) of the images after
the resize protocol, Frechet distance (`eval.metrics`) to reference statistics written by
`reference_stats` from the COCO val2014 images through the same protocol.

CLIP score (`ClipScorer`): the mean over image/prompt pairs of the raw cosine between the
projected embeddings of a CLIP model's two towers (`sd.clip_score.cosine`), as DMD2's
`compute_clip_score`: images centre-cropped and LANCZOS-resized to 256 (the FID protocol's
first step), then CLIP's preprocessing (PIL BICUBIC to the tower's size, CLIP mean/std);
prompts prefixed with "A photo depicts " (Hessel et al., 2021, CLIPScore) and truncated to
77 tokens with the end token kept. DMD2's SD1.5 evaluation (`test_folder_sd.py`) uses
open_clip's ViT-g/14 `laion2b_s12b_b42k`; its transformers copy
(laion/CLIP-ViT-g-14-laion2B-s12B-b42K: config.json + weights + tokenizer files) loads
here. The paper's 0.292 (f-distill JS) and 0.287 (DMD2) are on this raw-cosine scale;
`clip_score_x100` is torchmetrics' 100 * max(cos, 0) for those who report 29.2. Numbers are
comparable only with the same CLIP weights (ViT-L/14, SD's own text tower, gives other
values).

In-batch similarity (the paper's Table 8): the mean pairwise cosine of DINO features of the
images of one prompt, Particle Guidance's protocol (`sd.dino`), when a DINO folder is given
and the samples hold several images per prompt.
"""

import dataclasses
import functools
import pathlib
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
import PIL.Image

from fdistill_jax import console
from fdistill_jax.metrics import fid
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.models.sd import clip as clip_nets
from fdistill_jax.metrics.t2i import clip_score
from fdistill_jax.metrics.t2i import coco
from fdistill_jax.metrics.t2i import dino as dino_lib
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.pipelines import sharded
from fdistill_jax.loaders import state_dict as weights

DMD2_PREFIX = "A photo depicts "
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


# ----------------------------------------------------------------------------
# CLIP: a transformers CLIPModel folder -> both towers, variables, tokenizer.


@dataclasses.dataclass
class Clip:
  vision: clip_nets.CLIPVisionModelWithProjection
  text: clip_nets.CLIPTextModelWithProjection
  variables: dict                  # {'vision': {'params'}, 'text': {'params'}}
  tokenizer: Any
  folder: str


def _check_clip_folder(folder: pathlib.Path):
  if not folder.is_dir():
    raise FileNotFoundError(f"--clip={folder} is not a folder; expected a transformers CLIP "
                            "model folder (config.json, model.safetensors, tokenizer files).")
  missing = [] if (folder / "config.json").is_file() else ["config.json"]
  if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
    missing.append("vocab.json + merges.txt (or tokenizer.json)")
  if not any((folder / f).is_file() for f in weights.weight_candidates(("model", "pytorch_model"))):
    missing.append("model.safetensors (or pytorch_model.bin)")
  if missing:
    raise FileNotFoundError(f"CLIP folder {folder} lacks {', '.join(missing)}; download the "
                            "whole model folder (e.g. huggingface-cli download "
                            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K --local-dir DIR).")


def load_clip(folder, dtype=jnp.float32) -> Clip:
  """Both towers with projections of a transformers `CLIPModel` folder (nothing executed)."""
  folder = pathlib.Path(folder)
  _check_clip_folder(folder)
  config = pipeline.read_json(folder / "config.json")
  if "text_config" not in config or "vision_config" not in config:
    raise ValueError(f"{folder}/config.json is not a CLIPModel config (needs text_config and "
                     "vision_config): give the folder of a full CLIP model, both towers.")
  vision = configs.vision_from_config(config, dtype)
  text = configs.text_with_projection_from_config(config, dtype)
  state_dict, path = weights.read_component(folder, ("model", "pytorch_model"))
  parts = {"vision": ("vision_model.", "visual_projection."),
           "text": ("text_model.", "text_projection.")}
  variables = {
      name: names.variables_from_state_dict(
          module, {k: v for k, v in state_dict.items() if k.startswith(parts[name])},
          f"CLIP {name} tower ({path})")
      for name, module in (("vision", vision), ("text", text))}
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = CLIPTokenizer(folder, text.text_model.max_position_embeddings,
                            vocab_size=text.text_model.vocab_size)
  return Clip(vision, text, variables, tokenizer, str(folder))


def clip_pixels(image: np.ndarray, image_size: int, eval_res: int = coco.EVAL_RES):
  """float32 [S, S, 3]: crop + LANCZOS to eval_res (DMD2), PIL BICUBIC to S, CLIP mean/std."""
  im = PIL.Image.fromarray(coco.crop_resize(image, eval_res) if eval_res else
                           coco.center_crop_square(np.asarray(image, np.uint8)))
  x = np.asarray(im.resize((image_size, image_size), PIL.Image.Resampling.BICUBIC), np.float32)
  return (x / 255.0 - np.asarray(clip_nets.IMAGE_MEAN, np.float32)) / np.asarray(
      clip_nets.IMAGE_STD, np.float32)


def _pair_cosine(vision, text, variables, pixels, tokens):
  image_embeds, _ = vision.apply(variables["vision"], pixels)
  text_embeds, _ = text.apply(variables["text"], tokens)
  return clip_score.cosine(image_embeds, text_embeds)


class ClipScorer:
  """Per-pair CLIP cosine of uint8 images and prompts (module docstring), jitted and
  batch-sharded over a 1-D ('data',) mesh of `devices` (default: all, `pipelines.sharded`)."""

  def __init__(self, clip, prefix: str = DMD2_PREFIX, eval_res: int = coco.EVAL_RES,
               devices=None, dtype=jnp.float32):
    """`clip`: a transformers CLIPModel folder, or a `Clip` already loaded."""
    self.clip = clip if isinstance(clip, Clip) else load_clip(clip, dtype)
    self.prefix, self.eval_res = prefix, eval_res
    self.pair_cosine = sharded.ShardedFn(
        functools.partial(_pair_cosine, self.clip.vision, self.clip.text), 2, devices)
    self._variables = self.pair_cosine.replicate(self.clip.variables)
    self.num_devices = self.pair_cosine.num_devices

  def pixels(self, images) -> np.ndarray:
    size = self.clip.vision.vision_model.image_size
    return np.stack(coco.host_map(lambda im: clip_pixels(np.asarray(im), size, self.eval_res),
                                  images))

  def tokens(self, prompts) -> np.ndarray:
    return self.clip.tokenizer([self.prefix + p for p in prompts])

  def __call__(self, images, prompts, batch_size: int = 64) -> np.ndarray:
    """Cosines [N] (float32) of images[i] (uint8 HWC, any size) with prompts[i]."""
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP score needs "
                       "one prompt per image.")
    batch_size = self.pair_cosine.round_up(min(batch_size, len(images)))
    progress, out = console.Counter("CLIP score", len(images)), []
    for start in range(0, len(images), batch_size):
      stop = min(start + batch_size, len(images))
      pad = batch_size - (stop - start)
      idx = list(range(start, stop)) + [stop - 1] * pad     # fixed shapes: one compile
      pixels = self.pixels([images[i] for i in idx])
      tokens = self.tokens([prompts[i] for i in idx])
      out.append(np.asarray(self.pair_cosine(self._variables, pixels, tokens))[:stop - start])
      progress(stop)
    return np.concatenate(out).astype(np.float32)


def clip_summary(cosines) -> dict:
  """{'clip_score': mean raw cosine, 'clip_score_x100': mean of 100 max(cos, 0) (torchmetrics)}."""
  cosines = np.asarray(cosines, np.float64)
  return {"clip_score": float(cosines.mean()),
          "clip_score_x100": float(np.mean(100.0 * np.maximum(cosines, 0.0)))}


# ----------------------------------------------------------------------------
# FID: reference statistics and scores under the resize protocol.


def reference_stats(images, feature_fn, out=None, protocol: str = "dmd2",
                    eval_res: int = coco.EVAL_RES, batch_size: int = 64) -> dict:
  """{'mu', 'sigma'} of indexable uint8 images (e.g. `coco.image_source`) after the protocol.

  Written to `out` (EDM format, read by `metrics.load_reference_stats`) when given, with
  `eval_res` (0 for the "inception" protocol) so that a mismatched protocol is caught.
  """
  features = fid.extract_features(coco.Resized(images, protocol, eval_res), feature_fn,
                                  batch_size, what="Inception features of the reference images")
  mu, sigma = metrics.feature_statistics(features)
  res = np.int64(eval_res if protocol == "dmd2" else 0)
  if out:
    metrics.save_reference_stats(out, mu, sigma, eval_res=res, num_images=np.int64(len(features)))
  return {"mu": mu, "sigma": sigma, "eval_res": res}


def check_protocol(stats, protocol, eval_res, where="--ref"):
  """Refuses reference statistics written under another resize protocol."""
  want = eval_res if protocol == "dmd2" else 0
  if "eval_res" in stats and int(stats["eval_res"]) != want:
    raise ValueError(f"{where} was computed with eval_res={int(stats['eval_res'])} (0: protocol "
                     f"'inception') but this evaluation uses protocol {protocol!r} with "
                     f"eval_res={eval_res}; recompute it or pass the matching flags.")


class T2IMetrics:
  """FID, CLIP score and in-batch similarity of (uint8 images, prompts), built once.

  Args:
    ref: reference statistics npz (`reference_stats` / evaluate_t2i --make_ref); None: no FID.
    inception: Inception weights (`eval.fid.load_feature_fn`; "random" for tests only).
    clip: a transformers CLIPModel folder; None: no CLIP score.
    protocol, eval_res: the resize protocol (`sd.coco`), as for the reference.
    fid_method: `metrics.frechet_distance`'s method ("eigh": fast, for periodic evaluation).
    feature_fn: an Inception feature function already built (`fid.make_feature_fn`), instead
      of `inception`.
    dino: a transformers ViTModel folder (facebook/dino-vitb8) for the in-batch similarity
      (`sd.dino`), computed over the prompts that have several images; `dino_batch_size`
      images per DINO batch (full-resolution ViT-B/8: 4097 tokens at 512 pixels).
  """

  def __init__(self, ref: Optional[str] = None, inception: Optional[str] = None,
               clip: Optional[str] = None, *, protocol: str = "dmd2",
               eval_res: int = coco.EVAL_RES, preprocessing: str = "tf",
               fid_method: str = "eigh", prefix: str = DMD2_PREFIX, batch_size: int = 64,
               feature_fn=None, dino: Optional[str] = None, dino_batch_size: int = 8):
    if not (ref or clip or dino):
      raise ValueError("nothing to evaluate: give reference statistics (FID), a CLIP folder "
                       "(CLIP score) and/or a DINO folder (in-batch similarity).")
    if ref and not (inception or feature_fn):
      raise ValueError("FID needs Inception weights (--inception) besides --ref.")
    coco.Resized([], protocol, eval_res)      # checks the protocol's name early
    self.protocol, self.eval_res, self.fid_method = protocol, eval_res, fid_method
    self.batch_size = batch_size
    self.ref = metrics.load_reference_stats(ref) if ref else None
    if self.ref is not None:
      check_protocol(self.ref, protocol, eval_res, str(ref))
    if ref and feature_fn is None:
      feature_fn = fid.load_feature_fn(inception, preprocessing)
    self.feature_fn = feature_fn
    self.clip = ClipScorer(clip, prefix, eval_res) if clip else None
    self.dino = dino_lib.DinoFeatures(dino) if dino else None
    self.dino_batch_size = dino_batch_size

  def fid(self, images) -> float:
    features = fid.extract_features(coco.Resized(images, self.protocol, self.eval_res),
                                    self.feature_fn, self.batch_size,
                                    what="FID: Inception features of the samples")
    mu, sigma = metrics.feature_statistics(features)
    return metrics.frechet_distance(mu, sigma, self.ref["mu"], self.ref["sigma"],
                                    method=self.fid_method)

  def __call__(self, images, prompts) -> dict:
    """{'fid', 'clip_score', 'clip_score_x100', 'in_batch_similarity', 'num_samples'} (keys
    for what was configured)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images are {images.dtype} of shape {images.shape}; expected uint8 NHWC "
                       "RGB (convert with data.pixels).")
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per "
                       "image.")
    if self.dino is not None:
      dino_lib.groups_of(prompts)           # refuses prompts with one image each, up front
    out = {"num_samples": len(images)}
    if self.ref is not None:
      out["fid"] = self.fid(images)
    if self.clip is not None:
      out.update(clip_summary(self.clip(images, prompts, self.batch_size)))
    if self.dino is not None:
      out["in_batch_similarity"] = dino_lib.similarity_of(images, prompts, self.dino,
                                                          self.dino_batch_size)
    return out
