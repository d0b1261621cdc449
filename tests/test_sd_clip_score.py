"""CLIP score: the text tower with projection against transformers, and the formula."""

import jax
import numpy as np
import pytest

from fdistill_jax.metrics.t2i import clip_score
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.loaders import state_dict as weights
from sd_helpers import TINY_TEXT, TINY_VISION, TOL, perturbed, rel_err

torch = pytest.importorskip("torch")


def _load(model, folder, build):
  model.save_pretrained(folder)
  module = build(pipeline.read_json(folder / "config.json"))
  state_dict = weights.read_component(folder, ("model",))[0]
  return module, names.variables_from_state_dict(module, state_dict)


def test_text_tower_with_projection_matches_transformers_and_scores_pairs(tmp_path):
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection,  # pylint: disable=g-import-not-at-top
                            CLIPVisionConfig, CLIPVisionModelWithProjection)
  torch.manual_seed(0)
  ref_text = perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)))
  ref_vision = perturbed(CLIPVisionModelWithProjection(CLIPVisionConfig(
      **{**TINY_VISION, "projection_dim": TINY_TEXT["projection_dim"]})), seed=1)
  text, text_vars = _load(ref_text, tmp_path / "text", configs.text_with_projection_from_config)
  vision, vision_vars = _load(ref_vision, tmp_path / "vision", configs.vision_from_config)
  ids = np.full((2, 77), 49407, np.int64)
  ids[:, 0] = 49406
  ids[0, 1:4] = [320, 1125, 539]
  with torch.no_grad():
    out = ref_text(torch.from_numpy(ids))
  embeds, hidden = jax.jit(text.apply)(text_vars, ids)
  assert rel_err(embeds, out.text_embeds.numpy()) < TOL
  assert rel_err(hidden, out.last_hidden_state.numpy()) < TOL
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_vision(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
  image_embeds, _ = jax.jit(vision.apply)(vision_vars, pixels)
  assert rel_err(image_embeds, ref) < TOL
  score = np.asarray(clip_score.cosine(image_embeds, embeds))
  assert score.shape == (2,) and np.all(np.abs(score) <= 1 + 1e-6)


def test_cosine_is_the_formula_on_fixed_features():
  """cos = <a, b> / (|a| |b|), against float64 numpy; a pair with b = 3a scores 1, b = -a -1."""
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
  b[0], b[1] = 3 * a[0], -a[1]
  want = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  got = np.asarray(clip_score.cosine(a.astype(np.float32), b.astype(np.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[:2], [1.0, -1.0], atol=1e-6)
