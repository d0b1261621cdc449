"""Teacher sampling on a tiny random SD folder: prompts, sharding, seeds, the command line."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.pipelines import sd_sampling as sampling
from sd_helpers import TOL, rel_err, tiny_folder, tiny_models  # noqa: F401

torch = pytest.importorskip("torch")

PROMPTS = ["a photo of a cat", "Two dogs playing in the snow &amp; sun", "東京の夜景"]


@pytest.fixture(scope="module")
def pipe(tiny_folder):
  return pipeline.load_pipeline(tiny_folder)


def test_encode_prompts_equals_transformers(pipe, tiny_models):
  """Tokenizer + Flax text encoder = the same ids through the PyTorch text encoder."""
  context = pipe.encode_prompts(PROMPTS + [""])
  ids = torch.from_numpy(pipe.tokenize(PROMPTS + [""]).astype(np.int64))
  with torch.no_grad():
    ref = tiny_models["text_encoder"](ids).last_hidden_state.numpy()
  assert context.shape == (4, 77, 32) and rel_err(context, ref) < TOL


def test_samples_do_not_depend_on_batch_or_devices(pipe):
  kwargs = dict(steps=2, cfg=3.0, height=16, width=16, seed=7, num_per_prompt=2)
  a, idx_a = sampling.sample(pipe, PROMPTS[:2], batch=4, devices=jax.devices()[:4], **kwargs)
  b, idx_b = sampling.sample(pipe, PROMPTS[:2], batch=1, devices=jax.devices()[:1], **kwargs)
  assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(idx_a, [0, 0, 1, 1])
  np.testing.assert_array_equal(idx_b, idx_a)
  np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)   # uint8 rounding only
  assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 0         # different noise per sample
  c, _ = sampling.sample(pipe, PROMPTS[:2], batch=4, devices=jax.devices()[:4],
                         **{**kwargs, "seed": 8})
  assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_sample_latents_follow_the_denoiser(pipe):
  """decode=False returns the Euler/DDIM latents; one step from pure noise is the guided D."""
  lat, _ = sampling.sample(pipe, PROMPTS[:1], steps=1, cfg=1.0, height=16, width=16, decode=False,
                           devices=jax.devices()[:1])
  sigmas = sampling.sampler_sigmas(pipe.schedule, "ddim", 1)
  noise = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (8, 8, 4)))(
      jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(1))))
  x = noise * np.sqrt(1 + sigmas[0] ** 2)
  d = jax.jit(pipe.denoiser())(x, sigmas[0], pipe.encode_prompts(PROMPTS[:1]))
  expected = (x + (sigmas[1] - sigmas[0]) * (x - d) / sigmas[0]) / np.sqrt(1 + sigmas[1] ** 2)
  np.testing.assert_allclose(lat, expected, rtol=1e-4, atol=1e-5)


def test_command_line(tmp_path, tiny_folder):
  from fdistill_jax.tools import cli  # pylint: disable=g-import-not-at-top
  from fdistill_jax.tools import sample_t2i  # pylint: disable=g-import-not-at-top
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a cat\n\nTwo dogs\n", encoding="utf-8")
  out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
  argv = [f"--model={tiny_folder}", "--prompt=a red apple", f"--prompts_file={prompts}",
          "--steps=2", "--cfg=2", "--height=16", "--width=16", "--sampler=euler", "--batch=3",
          f"--out={out}", f"--npz={npz}", "--seed=3"]
  assert cli.invoke(sample_t2i.main, "sample_t2i", sample_t2i.FLAGS, argv) == 0
  with np.load(npz) as data:
    assert data["images"].shape == (3, 16, 16, 3) and data["images"].dtype == np.uint8
    assert list(data["prompts"]) == ["a red apple", "a photo of a cat", "Two dogs"]
    np.testing.assert_array_equal(data["prompt_index"], [0, 1, 2])
    assert int(data["seed"]) == 3
  width, height = Image.open(out).size       # 3 captioned tiles, 2 per row, enlarged
  assert width > 2 * 100 and height > 2 * 100
  assert "2\tTwo dogs" in (tmp_path / "grid.png.txt").read_text(encoding="utf-8")


def test_command_line_never_replaces_what_it_was_not_asked_to(tmp_path, capsys):
  """--out / --npz are checked before any model is read (the model path here does not even
  exist): an existing file needs --overwrite, an input is never an output, --npz is .npz."""
  from fdistill_jax.tools import cli  # pylint: disable=g-import-not-at-top
  from fdistill_jax.tools import sample_t2i  # pylint: disable=g-import-not-at-top
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a cat\n")
  kept = tmp_path / "kept.npz"
  kept.write_bytes(b"the user's file")
  base = [f"--model={tmp_path / 'no_model'}", f"--prompts_file={prompts}"]
  invoke = lambda extra: (cli.invoke(sample_t2i.main, "sample_t2i", sample_t2i.FLAGS,
                                     base + extra), capsys.readouterr().err)
  for extra, said in (([f"--npz={kept}"], "exists: choose another path, or pass --overwrite"),
                      ([f"--out={prompts}"], "is (or lies inside) the input"),
                      ([f"--npz={tmp_path / 'samples.bin'}"], "name a .npz file"),
                      ([f"--out={tmp_path / 'a.npz'}", f"--npz={tmp_path / 'a.npz'}"],
                       "are the same file")):
    code, err = invoke(extra)
    assert code != 0 and said in err, (extra, err)
  assert kept.read_bytes() == b"the user's file" and prompts.read_text() == "a cat\n"
  assert sorted(os.listdir(tmp_path)) == ["kept.npz", "prompts.txt"]
  code, err = invoke([f"--npz={kept}", "--overwrite"])   # passes the check; no model
  assert code != 0 and "no_model" in err and kept.read_bytes() == b"the user's file"


def test_text_to_image_grid_has_one_column_per_image_of_a_prompt(tmp_path, monkeypatch):
  """2 prompts x 4 images: a 4-column grid (one row per prompt), not ceil(sqrt(8)) = 3."""
  from fdistill_jax.problems.t2i import run_sampling  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(run_sampling.figures, "save_image_grid",
                      lambda images, path, **kw: calls.append(kw) or path)
  images = np.zeros((8, 4, 4, 3), np.uint8)
  run_sampling.write_outputs(images, np.repeat(np.arange(2), 4), ["a", "b"], 0,
                           out=str(tmp_path / "g.png"))
  assert calls[0]["ncols"] == 4 and calls[0]["labels"] == ["a"] * 4 + ["b"] * 4
