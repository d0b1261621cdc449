"""In-batch similarity (sd/dino.py): the Flax ViT against transformers' ViTModel, the metric
against its definition, and `evaluate_t2i --dino` end to end, on a tiny random ViT."""

import json
import sys

import numpy as np
import pytest

from fdistill_jax.models import vit
from fdistill_jax.metrics.t2i import dino
from fdistill_jax.tools import cli
from fdistill_jax.tools import evaluate_t2i as tool
from sd_helpers import TOL, perturbed, rel_err

torch = pytest.importorskip("torch")

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                image_size=32, patch_size=8, layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
  """(folder, torch ViTModel): a perturbed random tiny ViT written with save_pretrained."""
  from transformers import ViTConfig, ViTModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = perturbed(ViTModel(ViTConfig(**TINY_VIT)))
  folder = tmp_path_factory.mktemp("dino")
  model.save_pretrained(folder)
  return folder, model


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_vit_matches_transformers(tiny_vit, size):
  """At the config's size and at another one (position embeddings interpolated as
  transformers' interpolate_pos_encoding: bicubic A = -0.75), to TOL relative error."""
  folder, ref = tiny_vit
  module, variables = dino.load_dino(folder)
  x = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
               interpolate_pos_encoding=True).last_hidden_state.numpy()
  assert rel_err(module.apply(variables, x), want) < TOL


def test_torch_bicubic_matrix_against_torch():
  grid = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(7, 5), mode="bicubic",
                                         align_corners=False).numpy()[0]
  mh, mw = vit.torch_bicubic_matrix(4, 7), vit.torch_bicubic_matrix(4, 5)
  np.testing.assert_allclose(np.einsum("oh,pw,chw->cop", mh, mw, grid[0]), want, atol=1e-5)


def test_in_batch_similarity_is_the_mean_off_diagonal_cosine():
  """Against a loop over ordered pairs; prompts with one image do not count."""
  rng = np.random.default_rng(2)
  f = rng.standard_normal((7, 5))
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  prompts = ["a", "b", "a", "c", "b", "a", "b"]
  groups = dino.groups_of(prompts)
  assert sorted(map(sorted, groups)) == [[0, 2, 5], [1, 4, 6]]
  want = np.mean([np.mean([f[i] @ f[j] for i in g for j in g if i != j]) for g in groups])
  assert dino.in_batch_similarity(f, groups) == pytest.approx(want, rel=1e-12)
  assert dino.in_batch_similarity(np.ones((3, 5)) / np.sqrt(5), [[0, 1, 2]]) == pytest.approx(1)
  with pytest.raises(ValueError, match="several images per prompt"):
    dino.groups_of(["a", "b"])


def test_cli_dino_in_batch_similarity(tmp_path, capsys, tiny_vit):
  """Prompt 'same': one image three times (similarity 1); prompt 'other': two images whose
  cosine comes from transformers' features; 'alone' has one image and does not count."""
  folder, ref = tiny_vit
  rng = np.random.default_rng(3)
  a, b, c, d = rng.integers(0, 256, (4, 40, 36, 3), np.uint8)
  images = np.stack([a, b, a, c, a, d])
  prompts = np.asarray(["same", "other", "alone"])
  index = np.array([0, 1, 0, 2, 0, 1], np.int32)
  np.savez(tmp_path / "s.npz", images=images, prompts=prompts, prompt_index=index)
  pixels = (np.stack([b, d]) / 255.0 - np.asarray(vit.IMAGENET_MEAN)) / np.asarray(vit.IMAGENET_STD)
  with torch.no_grad():
    cls = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32)),
              interpolate_pos_encoding=True).last_hidden_state[:, 0].numpy().astype(np.float64)
  cos = cls[0] @ cls[1] / np.linalg.norm(cls[0]) / np.linalg.norm(cls[1])
  code = cli.invoke(tool.main, "evaluate_t2i", tool.FLAGS,
                    [f"--samples={tmp_path / 's.npz'}", f"--dino={folder}",
                     f"--out={tmp_path / 'm.json'}"])
  out = capsys.readouterr()
  assert code == 0, out.err
  result = json.loads((tmp_path / "m.json").read_text())
  assert result["in_batch_similarity"] == pytest.approx((1 + cos) / 2, abs=1e-5)
  np.savez(tmp_path / "single.npz", images=images[:3], prompts=prompts,
           prompt_index=np.arange(3, dtype=np.int32))
  code = cli.invoke(tool.main, "evaluate_t2i", tool.FLAGS,
                    [f"--samples={tmp_path / 'single.npz'}", f"--dino={folder}",
                     f"--out={tmp_path / 'single.json'}"])
  assert code == 1 and "several images per prompt" in capsys.readouterr().err
  assert not (tmp_path / "single.json").exists()
