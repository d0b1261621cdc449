"""Tests for fdistill_jax.data: order, sources (tfds mock, EDM files, memory),
errors, and the prefetcher.

Expected batches are computed independently: images we wrote ourselves (or
that tfds returns for an index) scaled by x / 127.5 - 1, labels through
np.eye. Float comparisons use atol 1e-6 (float32 rounding of x / 127.5 - 1).
"""

import io
import json
import threading
import zipfile

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from fdistill_jax.data import registry
from fdistill_jax.data import sources

ATOL = 1e-6  # float32 rounding of uint8 / 127.5 - 1.


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(num_threads=2, **kw))


def _index_images(n, shape=(2, 2, 1)):
  """uint8 images whose pixel value 25 * i encodes their index i."""
  return np.broadcast_to((25 * np.arange(n, dtype=np.uint8))[:, None, None,
                                                             None],
                         (n, *shape)).copy()


def _decode_index(images):
  return np.rint((images[:, 0, 0, 0] + 1) * 127.5 / 25).astype(int)


def _memory(n=10, num_classes=3, seed=0):
  return registry.make_source(_cfg(kind="memory", images=_index_images(n),
                               labels=np.arange(n) % max(num_classes, 1),
                               resolution=2, channels=1,
                               num_classes=num_classes, seed=seed))


# ----------------------------------------------------------------------------
# Order, determinism, process shares (memory source).


def test_each_epoch_visits_every_example_once_across_boundaries():
  src = _memory(n=10)
  got = np.concatenate([_decode_index(src.batch(s, global_batch_size=4)
                                      ["images"]) for s in range(5)])
  # Steps 0..4 with B=4 cover stream positions 0..19 = exactly two epochs,
  # the boundary falling inside step 2.
  np.testing.assert_array_equal(np.sort(got[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(got[10:]), np.arange(10))
  assert not np.array_equal(got[:10], got[10:])  # A new order per epoch.
  assert not np.array_equal(got[:10], np.arange(10))  # Shuffled at all.


def test_images_and_one_hot_labels_match_the_indexed_examples():
  src = _memory(n=10, num_classes=3)
  b = src.batch(3, global_batch_size=6)
  idx = _decode_index(b["images"])
  np.testing.assert_allclose(b["images"][:, 0, 0, 0], 25 * idx / 127.5 - 1,
                             atol=ATOL)
  np.testing.assert_array_equal(b["labels"], np.eye(3)[idx % 3])
  assert b["images"].dtype == b["labels"].dtype == np.float32


def test_deterministic_in_seed_and_step_and_resumable():
  a, b, c = _memory(seed=1), _memory(seed=1), _memory(seed=2)
  run = [a.batch(s, global_batch_size=4)["images"] for s in range(6)]
  resumed = [b.batch(s, global_batch_size=4)["images"] for s in (4, 5)]
  np.testing.assert_array_equal(np.stack(run[4:]), np.stack(resumed))
  assert not np.array_equal(run[0], run[1])
  assert not np.array_equal(run[0], c.batch(0, global_batch_size=4)["images"])


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_concatenate_to_the_global_batch(count):
  src = _memory(n=10)
  for step in (0, 2, 7):  # Step 2 straddles an epoch boundary.
    whole = src.batch(step, global_batch_size=8)
    parts = [src.batch(step, global_batch_size=8, process_index=p,
                       process_count=count) for p in range(count)]
    for key in ("images", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), whole[key])


def test_float_images_pass_through_and_unconditional_labels_are_empty():
  imgs = np.linspace(-1, 1, 5 * 12, dtype=np.float32).reshape(5, 2, 2, 3)
  src = registry.make_source(_cfg(kind="memory", images=imgs, labels=None,
                              resolution=2, num_classes=0))
  b = src.batch(0, global_batch_size=5)
  np.testing.assert_allclose(np.sort(b["images"].ravel()), imgs.ravel(),
                             atol=ATOL)
  assert b["labels"].shape == (5, 0)


@pytest.mark.parametrize("kw, match", [
    (dict(resolution=4), r"\(N, 4, 4, 1\)|\[N, 4, 4, 1\]"),
    (dict(channels=3), r"\[N, 2, 2, 3\]"),
    (dict(labels=np.arange(10)), r"\[0, 3\)"),
    (dict(images=_index_images(10).astype(np.float32)), r"\[-1, 1\]"),
    (dict(kind="nope"), r"known kinds: .*memory"),
    (dict(resolution=None), r"resolution"),
])
def test_memory_source_refuses_bad_data_with_the_expected_shape(kw, match):
  cfg = dict(kind="memory", images=_index_images(10), labels=np.arange(10) % 3,
             resolution=2, channels=1, num_classes=3)
  cfg.update(kw)
  if cfg["resolution"] is None:
    del cfg["resolution"]
  with pytest.raises(ValueError, match=match):
    registry.make_source(_cfg(**cfg))


@pytest.mark.parametrize("bs, p, count", [(6, 0, 4), (0, 0, 1), (8, 2, 2)])
def test_batch_not_divisible_by_processes_is_refused(bs, p, count):
  with pytest.raises(ValueError, match="process"):
    _memory().batch(0, global_batch_size=bs, process_index=p,
                    process_count=count)


# ----------------------------------------------------------------------------
# TFDS through tfds.data_source, mocked.

TFDS_CASES = [("cifar10", 32, 10), ("imagenet_resized/64x64", 64, 1000)]


@pytest.mark.parametrize("name, res, classes", TFDS_CASES)
def test_tfds_batches_are_the_indexed_examples(name, res, classes):
  with tfds.testing.mock_data(num_examples=10):
    cfg = _cfg(kind="tfds", name=name, resolution=res, num_classes=classes,
               seed=3)
    src, twin = registry.make_source(cfg), registry.make_source(cfg)
    direct = tfds.data_source(name, split="train")
    for step in (0, 2, 7):  # Step 2 straddles the epoch boundary (N=10).
      b = src.batch(step, global_batch_size=4)
      idx = sources.example_indices(3, step, global_batch_size=4, num_examples=10)
      want = np.stack([direct[int(i)]["image"] for i in idx]) / 127.5 - 1
      labels = np.eye(classes)[[int(direct[int(i)]["label"]) for i in idx]]
      assert b["images"].shape == (4, res, res, 3)
      np.testing.assert_allclose(b["images"], want, atol=ATOL)
      np.testing.assert_array_equal(b["labels"], labels)
      assert -1 <= b["images"].min() and b["images"].max() <= 1
      np.testing.assert_array_equal(
          twin.batch(step, global_batch_size=4)["images"], b["images"])
      halves = [src.batch(step, global_batch_size=4, process_index=p,
                          process_count=2)["images"] for p in (0, 1)]
      np.testing.assert_array_equal(np.concatenate(halves), b["images"])
    assert not np.array_equal(src.batch(0, global_batch_size=4)["images"],
                              src.batch(1, global_batch_size=4)["images"])


def test_tfds_refuses_wrong_resolution_and_class_count():
  with tfds.testing.mock_data(num_examples=10):
    with pytest.raises(ValueError, match=r"expects \(64, 64, 3\)"):
      registry.make_source(_cfg(kind="tfds", name="cifar10", resolution=64,
                            num_classes=10))
    with pytest.raises(ValueError, match=r"\[0, 10\).*num_classes=10"):
      registry.make_source(_cfg(kind="tfds", name="cifar10", resolution=32,
                            num_classes=1000))
    uncond = registry.make_source(_cfg(kind="tfds", name="cifar10", resolution=32,
                                   num_classes=0))
    assert uncond.batch(0, global_batch_size=2)["labels"].shape == (2, 0)


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  cfg = _cfg(kind="tfds", name="cifar10", resolution=32, num_classes=10,
             data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as err:
    registry.make_source(cfg)
  msg = str(err.value)
  assert f"tfds build cifar10 --data_dir={tmp_path}" in msg
  assert "download_and_prepare()" in msg and "array_record" in msg
  with pytest.raises(FileNotFoundError, match="unknown to tfds"):
    registry.make_source(_cfg(kind="tfds", name="no_such_dataset_xyz",
                          resolution=32, num_classes=0))


# ----------------------------------------------------------------------------
# EDM dataset_tool.py format.


def _write_edm(root, images, labels, as_zip):
  """Writes EDM's layout: 00000/img00000000.png ... plus dataset.json."""
  files = {}
  for i, img in enumerate(images):
    buf = io.BytesIO()
    PIL.Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
        buf, format="png")
    files[f"{i // 1000:05d}/img{i:08d}.png"] = buf.getvalue()
  meta = {"labels": None if labels is None else
          [[name, int(l)] for name, l in zip(files, labels)]}
  files["dataset.json"] = json.dumps(meta).encode()
  if as_zip:
    path = root / "ds.zip"
    with zipfile.ZipFile(path, "w") as z:
      for name, blob in files.items():
        z.writestr(name, blob)
  else:
    path = root / "ds"
    for name, blob in files.items():
      (path / name).parent.mkdir(parents=True, exist_ok=True)
      (path / name).write_bytes(blob)
  return str(path)


@pytest.fixture(name="edm_arrays")
def _edm_arrays():
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
          rng.integers(0, 4, 12))


@pytest.mark.parametrize("as_zip, cache", [(False, False), (True, False),
                                           (True, True)])
def test_edm_batches_are_the_written_images(tmp_path, edm_arrays, as_zip,
                                            cache):
  images, labels = edm_arrays
  path = _write_edm(tmp_path, images, labels, as_zip)
  cfg = _cfg(kind="edm", path=path, resolution=8, num_classes=4, seed=5,
             cache=cache)
  src, twin = registry.make_source(cfg), registry.make_source(cfg)
  for step in (0, 2, 9):  # B=5, N=12: steps 2 and 9 straddle epochs.
    b = src.batch(step, global_batch_size=5)
    idx = sources.example_indices(5, step, global_batch_size=5, num_examples=12)
    np.testing.assert_allclose(b["images"], images[idx] / 127.5 - 1,
                               atol=ATOL)
    np.testing.assert_array_equal(b["labels"], np.eye(4)[labels[idx]])
    np.testing.assert_array_equal(
        twin.batch(step, global_batch_size=5)["images"], b["images"])
  parts = [src.batch(4, global_batch_size=6, process_index=p,
                     process_count=3)["labels"] for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts),
                                src.batch(4, global_batch_size=6)["labels"])


def test_edm_unlabelled_and_grayscale(tmp_path, edm_arrays):
  gray = edm_arrays[0][..., :1]
  path = _write_edm(tmp_path, gray, None, as_zip=True)
  src = registry.make_source(_cfg(kind="edm", path=path, resolution=8,
                              channels=1, num_classes=0))
  b = src.batch(0, global_batch_size=12)
  assert b["labels"].shape == (12, 0) and b["images"].shape == (12, 8, 8, 1)
  np.testing.assert_allclose(np.sort(b["images"].ravel()),
                             np.sort(gray.ravel() / 127.5 - 1), atol=ATOL)
  with pytest.raises(ValueError, match=r"expects \(8, 8, 3\)"):
    registry.make_source(_cfg(kind="edm", path=path, resolution=8, num_classes=0))
  with pytest.raises(ValueError, match="has no labels"):
    registry.make_source(_cfg(kind="edm", path=path, resolution=8, channels=1,
                          num_classes=4))


def test_edm_refuses_wrong_size_and_labels(tmp_path, edm_arrays):
  images, labels = edm_arrays
  path = _write_edm(tmp_path, images, labels, as_zip=False)
  with pytest.raises(ValueError, match=r"expects \(16, 16, 3\)"):
    registry.make_source(_cfg(kind="edm", path=path, resolution=16,
                          num_classes=4))
  with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
    registry.make_source(_cfg(kind="edm", path=path, resolution=8, num_classes=3))
  # One odd-sized image is caught when a batch reaches it, naming the file.
  PIL.Image.new("RGB", (4, 4)).save(tmp_path / "ds/00000/img00000007.png")
  src = registry.make_source(_cfg(kind="edm", path=path, resolution=8,
                              num_classes=4))
  with pytest.raises(ValueError, match=r"img00000007.png.*\(4, 4, 3\)"):
    src.batch(0, global_batch_size=12)


def test_edm_missing_dataset_says_how_to_prepare_it(tmp_path):
  for path in (str(tmp_path / "cifar.zip"), ""):  # "" = unset in configs.
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)not found.*dataset_tool"):
      registry.make_source(_cfg(kind="edm", path=path, resolution=32,
                            num_classes=10))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"(?s)No image.*dataset_tool"):
    registry.make_source(_cfg(kind="edm", path=str(tmp_path / "empty"),
                          resolution=32, num_classes=10))


# ----------------------------------------------------------------------------
# Prefetcher.


def test_prefetcher_yields_the_direct_batches_in_order():
  src = _memory(n=10)
  with sources.Prefetcher(src, 5, global_batch_size=4, process_index=1,
                       process_count=2, num_steps=4) as it:
    got = list(it)
  assert len(got) == 4
  for step, b in zip(range(5, 9), got):
    want = src.batch(step, global_batch_size=4, process_index=1,
                     process_count=2)
    np.testing.assert_array_equal(b["images"], want["images"])
    np.testing.assert_array_equal(b["labels"], want["labels"])


class _FailsAt:
  num_classes, image_shape = 3, (2, 2, 1)

  def __init__(self, inner, bad_step):
    self.inner, self.bad_step = inner, bad_step

  def batch(self, step, **kw):
    if step == self.bad_step:
      raise OSError(f"disk gone at step {step}")
    return self.inner.batch(step, **kw)


def test_prefetcher_reraises_worker_errors_in_the_consumer():
  it = sources.Prefetcher(_FailsAt(_memory(), 7), 5, global_batch_size=2)
  it.next()
  next(it)
  with pytest.raises(OSError, match="disk gone at step 7"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "fdistill-prefetch"]


def test_prefetcher_close_stops_a_blocked_worker():
  before = len(_prefetch_threads())
  it = sources.Prefetcher(_memory(), 0, global_batch_size=2, buffer_size=1,
                       transform=lambda b: b["labels"].sum())
  assert next(it) == 2.0  # transform ran in the worker: 2 one-hot rows.
  assert len(_prefetch_threads()) == before + 1  # Blocked on a full queue.
  it.close()
  assert len(_prefetch_threads()) == before
  with pytest.raises(StopIteration):
    next(it)
