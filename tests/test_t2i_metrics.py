"""COCO evaluation of text-to-image samples: sd/coco.py, sd/t2i_metrics.py, tools/evaluate_t2i.

Tiny CLIP models are transformers `CLIPModel`s written with `save_pretrained` next to the
SD 1.5 tokenizer files of the fixtures; the Inception network is the random stand-in
(`--inception=random`) or a cheap feature function. The formula of the cosine itself is
tested in tests/test_sd_clip_score.py, and the Frechet distance's closed forms in
tests/test_evaluate.py; here they are checked through this module's paths.
"""

import io
import json
import shutil
import zipfile

import numpy as np
import PIL.Image
import pytest

from fdistill_jax.data import webdataset
from fdistill_jax.metrics.t2i import coco
from fdistill_jax.metrics.t2i import metrics as t2i_metrics
from fdistill_jax.tools import cli
from fdistill_jax.tools import evaluate_t2i as tool
from tests.t2i_helpers import CAPTIONS, colour_images, features

torch = pytest.importorskip("torch")

# ----------------------------------------------------------------------------
# CLIP score.


def test_clip_score_prefers_matching_captions_only_when_towers_are_tied(clip_folders):
  """Tied towers: matching pairs score ~1, shifted pairs ~0. The same towers with random
  projections fail the margin (measured 0.003), so the check can fail."""
  folders, reference = clip_folders
  images = colour_images()
  margins = {}
  for name, folder in folders.items():
    scorer = t2i_metrics.ClipScorer(folder)
    matched = scorer(images, CAPTIONS)
    mismatched = scorer(images, CAPTIONS[1:] + CAPTIONS[:1])
    margins[name] = float(matched.mean() - mismatched.mean())
    if name == "untied":   # our loading + tokens + pixels == transformers' CLIPModel
      np.testing.assert_allclose(matched, reference["untied"], atol=1e-5)
    else:
      np.testing.assert_allclose(matched, 1.0, atol=1e-4)
      np.testing.assert_allclose(mismatched, 0.0, atol=1e-4)
  assert margins["tied"] > 0.99
  assert abs(margins["untied"]) < 0.2, margins


def test_clip_summary_conventions():
  cos = np.array([0.3, -0.1, 0.25])
  got = t2i_metrics.clip_summary(cos)
  assert got["clip_score"] == pytest.approx(0.15)
  assert got["clip_score_x100"] == pytest.approx(100 * (0.3 + 0 + 0.25) / 3)


# ----------------------------------------------------------------------------
# Resize protocol, against an independent numpy implementation of PIL's resampling.


def _lanczos(x):
  return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


def _bicubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def _resample_matrix(n_in, n_out, kernel, support):
  """PIL's antialiased resampling along one axis: [n_out, n_in] normalised weights."""
  scale = n_in / n_out
  filterscale = max(scale, 1.0)
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support * filterscale + 0.5), 0)
    hi = min(int(centre + support * filterscale + 0.5), n_in)
    w = kernel((np.arange(lo, hi) - centre + 0.5) / filterscale)
    weights[i, lo:hi] = w / w.sum()
  return weights


def _smooth_image(h, w, seed):
  """Low-frequency RGB in [50, 205]: no resampling overshoot is clipped."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  ch = [128 + 25 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)
                          + rng.uniform(0, 6)) + 25 * np.cos(3 * np.pi * x * rng.uniform(0.5, 1))
        for _ in range(3)]
  return np.rint(np.stack(ch, -1)).astype(np.uint8)


@pytest.mark.parametrize("shape,offsets", [((40, 40), (0, 0)), ((50, 45), (2, 0)),
                                           ((45, 52), (0, 4)), ((40, 47), (0, 4)),
                                           ((40, 45), (0, 2))])
def test_center_crop_follows_torchvision_rounding(shape, offsets):
  """torchvision: top = int(round((h - s) / 2)), Python's round (half to even)."""
  image = np.arange(shape[0] * shape[1] * 3).reshape(*shape, 3)
  s = min(shape)
  np.testing.assert_array_equal(coco.center_crop_square(image),
                                image[offsets[0]:offsets[0] + s, offsets[1]:offsets[1] + s])


def test_resize_protocol_matches_an_independent_resampler():
  """crop + LANCZOS 256 (rounded to uint8 after each pass, width first, as PIL; tolerance
  two grey levels on < 1% of the values for PIL's fixed-point weights) and clean-fid's
  bicubic 256 -> 299 on float32 (tolerance 1e-3), against numpy filter matrices."""
  image = _smooth_image(300, 340, seed=0)
  square = image[:, 20:320].astype(np.float64)
  m = _resample_matrix(300, 256, _lanczos, 3.0)
  rows = np.clip(np.rint(np.einsum("pw,hwc->hpc", m, square)), 0, 255)  # PIL: width, uint8
  want = np.rint(np.einsum("oh,hpc->opc", m, rows))                       # then height
  got = coco.crop_resize(image, 256)
  assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
  # Measured: 0.11% of the values differ, by one level and rarely two (an intermediate
  # value rounded the other way, times a lobe weight near 1, plus the final rounding).
  assert np.abs(got - want).max() <= 2.0 and np.mean(got != want) < 0.01
  m2 = _resample_matrix(256, 299, _bicubic, 2.0)
  want2 = np.einsum("oh,hpc->opc", m2, np.einsum("pw,hwc->hpc", m2, got.astype(np.float64)))
  clean = coco.clean_resize(got)
  assert clean.dtype == np.float32 and np.abs(clean - want2).max() < 1e-3
  resized = coco.Resized(image[None].repeat(3, 0), "dmd2", 256)
  np.testing.assert_array_equal(resized[1:3], np.rint(clean)[None].repeat(2, 0).astype(np.uint8))
  assert coco.Resized(image[None], "inception")[0:1].shape == (1, 300, 340, 3)
  with pytest.raises(ValueError, match="unknown resize protocol"):
    coco.Resized(image[None], "bilinear")


# ----------------------------------------------------------------------------
# FID through the protocol, with a cheap stand-in feature function.


def test_fid_against_own_and_shifted_reference(tmp_path):
  """Against its own statistics FID ~ 0; against mu + delta (same sigma) it is |delta|^2,
  the closed form of the Frechet distance between Gaussians with equal covariance."""
  rng = np.random.default_rng(1)
  images = np.stack([_smooth_image(48, 40, seed=s) for s in range(20)])
  images = np.clip(images.astype(int) + rng.integers(-20, 20, images.shape), 0, 255)
  images = images.astype(np.uint8)
  stats = t2i_metrics.reference_stats(images, features, tmp_path / "ref.npz", "dmd2", 32,
                                       batch_size=8)
  metrics = t2i_metrics.T2IMetrics(str(tmp_path / "ref.npz"), feature_fn=features, eval_res=32,
                                   batch_size=8)
  scale = np.trace(stats["sigma"])
  assert metrics(images, ["p"] * 20)["fid"] < 1e-6 * scale
  delta = rng.normal(size=stats["mu"].shape) * 3
  with np.load(tmp_path / "ref.npz") as ref:
    np.savez(tmp_path / "shifted.npz", **{**ref, "mu": ref["mu"] + delta})
  shifted = t2i_metrics.T2IMetrics(str(tmp_path / "shifted.npz"), feature_fn=features,
                                   eval_res=32, batch_size=8)
  assert shifted.fid(images) == pytest.approx(float(delta @ delta), rel=1e-6)
  with pytest.raises(ValueError, match="eval_res=32"):   # another protocol's statistics
    t2i_metrics.T2IMetrics(str(tmp_path / "ref.npz"), feature_fn=features, eval_res=256)


# ----------------------------------------------------------------------------
# Prompts.


def _annotations(path, seed=0, shuffle=False):
  """captions_val2014.json format: 6 images with 1-3 captions each (and one empty caption)."""
  rows = [{"image_id": 100 + i, "id": 10 * i + j, "caption": f" image {i}\ncaption {j} "}
          for i in range(6) for j in range(1 + i % 3)]
  rows.append({"image_id": 105, "id": 999, "caption": "   "})
  if shuffle:   # images interleaved differently, each image's captions kept in order
    order = np.random.default_rng(seed).permutation(6)
    rows = [r for i in order for r in rows if r["image_id"] == 100 + i]
  path.write_text(json.dumps({"info": {}, "images": [], "annotations": rows}))
  return path


def run(args, capsys=None):
  code = cli.invoke(tool.main, "evaluate_t2i", tool.FLAGS, args)
  return code, (capsys.readouterr() if capsys else None)


def test_prompts_from_captions_json_are_deterministic_in_the_seed(tmp_path):
  ann = _annotations(tmp_path / "captions_val2014.json")
  outs = {}
  for name, seed, source in (("a", 0, ann), ("b", 0, ann), ("c", 1, ann),
                             ("d", 0, _annotations(tmp_path / "shuffled.json", shuffle=True))):
    out = tmp_path / f"{name}.jsonl"
    assert run([f"--write_prompts={out}", f"--captions={source}", "--num=4",
                f"--seed={seed}"])[0] == 0
    outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
  assert outs["a"] == outs["b"] == outs["d"] and outs["a"] != outs["c"]
  ids = [r["image_id"] for r in outs["a"]]
  assert len(set(ids)) == 4                          # one caption per image
  for r in outs["a"]:                                # the caption is one of its image's
    assert r["caption"].startswith(f"image {r['image_id'] - 100} caption ")
  assert run([f"--write_prompts={tmp_path / 'p.txt'}", f"--captions={ann}", "--num=6"])[0] == 0
  lines = (tmp_path / "p.txt").read_text().splitlines()
  assert len(lines) == 6 and webdataset.read_prompts(tmp_path / "p.txt")[0] == lines


def test_prompts_and_images_from_tfds(monkeypatch):
  """tfds coco_captions splits (mocked open_split): captions per image id, images in order."""
  def example(i):
    return {"image": np.full((4, 5, 3), i, np.uint8), "image/id": 7 + i,
            "captions": {"text": np.array([b"a cat %d" % i, b"a dog"], object)}}
  splits = {"val": [example(0), example(1)], "restval": [example(2)], "test": [example(3)]}
  monkeypatch.setattr(coco.tfds_data, "open_split", lambda n, s, d: (None, splits[s]))
  pairs = coco.pairs_from_tfds()
  assert len(pairs) == 8 and pairs[4] == (9, "a cat 2")
  images = coco.image_source(coco.TFDS_COCO)
  assert len(images) == 4 and [int(images[i][0, 0, 0]) for i in range(4)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------
# The command line end to end, and bad inputs.


def _samples(path, images, captions, index=None, **override):
  arrays = {"images": images, "prompts": np.asarray(captions),
            "prompt_index": np.arange(len(images), dtype=np.int32) if index is None else index,
            "seed": np.int64(0), **override}
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def test_load_samples_maps_stored_images_and_reads_compressed_ones(tmp_path):
  images = np.random.default_rng(3).integers(0, 256, (5, 12, 10, 3), np.uint8)
  arrays = {"images": images, "prompts": np.asarray(["a cat", "a dog"]),
            "prompt_index": np.array([0, 1, 0, 1, 1], np.int32)}
  np.savez(tmp_path / "s.npz", **arrays)
  np.savez_compressed(tmp_path / "c.npz", **arrays)
  stored, prompts = coco.load_samples(tmp_path / "s.npz")
  compressed, prompts_c = coco.load_samples(tmp_path / "c.npz")
  assert isinstance(stored, np.memmap) and not isinstance(compressed, np.memmap)
  np.testing.assert_array_equal(stored, images)
  np.testing.assert_array_equal(compressed, images)
  assert prompts == prompts_c == ["a cat", "a dog", "a cat", "a dog", "a dog"]


def _zip_npz(path, arrays, suffix=".npy", method=zipfile.ZIP_STORED):
  """An npz written member by member: names `KEY + suffix`, compression `method`."""
  with zipfile.ZipFile(path, "w", method) as archive:
    for key, value in arrays.items():
      buffer = io.BytesIO()
      np.save(buffer, value)
      archive.writestr(key + suffix, buffer.getvalue())
  return path


def test_load_samples_reads_members_named_without_npy(tmp_path):
  """Some writers name npz members 'images' rather than 'images.npy': both read the same."""
  images = np.random.default_rng(4).integers(0, 256, (3, 4, 6, 3), np.uint8)
  arrays = {"images": images, "prompts": np.asarray(["x", "y"]),
            "prompt_index": np.array([1, 0, 1], np.int32)}
  got, prompts = coco.load_samples(_zip_npz(tmp_path / "bare.npz", arrays, suffix=""))
  np.testing.assert_array_equal(got, images)
  assert prompts == ["y", "x", "y"]


def test_load_samples_refuses_a_compression_method_it_does_not_need(tmp_path):
  """bzip2 / lzma members inflate in one call whatever size they declare: refused, one line."""
  arrays = {"images": np.zeros((1, 2, 2, 3), np.uint8), "prompts": np.asarray(["x"]),
            "prompt_index": np.zeros(1, np.int32)}
  path = _zip_npz(tmp_path / "bz.npz", arrays, method=zipfile.ZIP_BZIP2)
  with pytest.raises(ValueError, match="compression method 12 refused"):
    coco.load_samples(path)


def test_coco_captions_json_is_parsed_with_a_depth_limit(tmp_path):
  path = tmp_path / "captions.json"
  path.write_text('{"annotations": ' + "[" * 5000 + "]" * 5000 + "}")
  with pytest.raises(ValueError, match="nested more than"):
    coco.pairs_from_annotations(path)
  path.write_text('{"annotations": [{"image_id": 1, "caption": "a  cat"}]}')
  assert coco.pairs_from_annotations(path) == [(1, "a cat")]


def test_cli_make_ref_and_score(tmp_path, capsys, clip_folders):
  """Reference stats of a folder, then FID and CLIP score (tied tiny CLIP: the four colour
  images with their captions score 1) in one JSON, written atomically.
  (FID ~ 0 of a set against itself is checked above: with 8 images the rank-7 covariances
  leave eigh's trace within rounding of zero, on either side.)"""
  rng = np.random.default_rng(2)
  real = rng.integers(0, 256, (8, 40, 36, 3), np.uint8)
  folder = tmp_path / "val2014"
  folder.mkdir()
  for i, image in enumerate(real):
    PIL.Image.fromarray(image).save(folder / f"COCO_val2014_{i:012d}.png")
  code, out = run([f"--make_ref={tmp_path / 'ref.npz'}", f"--ref_images={folder}",
                   "--inception=random", "--batch_size=8", "--eval_res=32"], capsys)
  assert code == 0, out.err
  assert json.loads(out.out)["num_images"] == 8
  with np.load(tmp_path / "ref.npz") as ref:
    assert ref["mu"].shape == (2048,) and int(ref["eval_res"]) == 32
  images = np.concatenate([colour_images(), real[:4]])
  samples = _samples(tmp_path / "samples.npz", images, CAPTIONS + ["noise"] * 4)
  code, out = run([f"--samples={samples}", f"--ref={tmp_path / 'ref.npz'}", "--inception=random",
                   f"--clip={clip_folders[0]['tied']}", "--batch_size=8", "--eval_res=32",
                   "--fid_method=eigh", f"--out={tmp_path / 'm.json'}"], capsys)
  assert code == 0, out.err
  written = json.loads((tmp_path / "m.json").read_text())
  assert written == json.loads(out.out)
  assert written["num_samples"] == 8 and "NOT FID" in written["inception"]
  assert np.isfinite(written["fid"]) and written["fid"] > 0
  assert 0.5 - 1e-3 < written["clip_score"] < 1   # (4 x 1 + 4 noise pairs in [-1, 1)) / 8
  assert written["clip_score_x100"] >= 100 * written["clip_score"] - 1e-4
  assert "in_batch_similarity" not in written and written["dino"] is None   # no --dino


def test_cli_outputs_never_replace_what_was_not_asked(tmp_path, capsys):
  """--out, --make_ref and --write_prompts: an existing file needs --overwrite, an input is
  never an output; checked before any model loads (the CLIP folder here does not exist)."""
  samples = _samples(tmp_path / "s.npz", colour_images(), CAPTIONS)
  before = samples.read_bytes()
  kept = tmp_path / "m.json"
  kept.write_text("keep")
  ann = _annotations(tmp_path / "captions.json")
  for args, said in (([f"--samples={samples}", "--clip=/no/clip", f"--out={kept}"], "exists"),
                     ([f"--samples={samples}", "--clip=/no/clip", f"--out={samples}"],
                      "the input")):
    code, out = run(args, capsys)
    assert code != 0 and said in out.err, (args, out.err)
  assert kept.read_text() == "keep" and samples.read_bytes() == before
  prompts = tmp_path / "p.txt"
  prompts.write_text("mine\n")
  args = [f"--write_prompts={prompts}", f"--captions={ann}", "--num=2"]
  code, out = run(args, capsys)
  assert code != 0 and "exists" in out.err and prompts.read_text() == "mine\n"
  assert run(args + ["--overwrite"], capsys)[0] == 0 and len(prompts.read_text().split("\n")) == 3


def test_cli_bad_inputs_say_what_and_write_nothing(tmp_path, capsys, clip_folders):
  images = colour_images()
  bad = {
      "lacks ['prompts']": _samples(tmp_path / "a.npz", images, CAPTIONS, prompts=None),
      "expected uint8": _samples(tmp_path / "b.npz", images.astype(np.float32), CAPTIONS),
      "prompt_index lies in": _samples(tmp_path / "c.npz", images, CAPTIONS[:2],
                                       index=np.arange(4, dtype=np.int32)),
      "one integer per image": _samples(tmp_path / "d.npz", images, CAPTIONS,
                                        index=np.arange(3, dtype=np.int32)),
  }
  clip = clip_folders[0]["tied"]
  for message, path in bad.items():
    code, out = run([f"--samples={path}", f"--clip={clip}", f"--out={tmp_path / 'm.json'}"],
                    capsys)
    assert code == 1 and message in out.err and out.err.count("\n") == 1, out.err
  broken = tmp_path / "clip_no_tokenizer"
  shutil.copytree(clip, broken)
  (broken / "vocab.json").unlink()
  (broken / "tokenizer.json").unlink()
  good = _samples(tmp_path / "good.npz", images, CAPTIONS)
  cases = [
      ([f"--samples={good}", f"--clip={broken}"], "lacks vocab.json + merges.txt"),
      ([f"--samples={good}", f"--clip={tmp_path / 'nowhere'}"], "is not a folder"),
      ([f"--samples={good}"], "needs --ref"),
      ([f"--samples={good}", f"--ref={tmp_path / 'ref.npz'}"], "needs Inception weights"),
      ([f"--write_prompts={tmp_path / 'p.txt'}",
        f"--captions={_annotations(tmp_path / 'ann.json')}", "--num=7"], "cover 6 images"),
      ([f"--write_prompts={tmp_path / 'p.csv'}", f"--captions={tmp_path / 'ann.json'}",
        "--num=2"], ".txt"),
      ([f"--make_ref={tmp_path / 'r.npz'}", f"--ref_images={tmp_path / 'nowhere'}",
        "--inception=random"], "neither a folder"),
      ([], "exactly one of"),
  ]
  for args, message in cases:
    code, out = run(args + [f"--out={tmp_path / 'm.json'}"], capsys)
    assert code == 1 and message in out.err, (args, out.err)
  assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.txt").exists()
  assert not (tmp_path / "r.npz").exists()
