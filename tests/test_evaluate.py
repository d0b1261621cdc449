"""fdistill_jax.metrics.distances and eval.fid: FID, precision/recall, statistics io, feature
batching, image sources; tools.evaluate: the command line."""

import json

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import scipy.spatial.distance

from fdistill_jax.metrics import fid
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.tools import cli
from fdistill_jax.tools import evaluate as evaluate_cli


def random_covariance(rng, d):
  a = rng.normal(size=(d, 2 * d))
  return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------
# Frechet distance and statistics.


METHODS = pytest.mark.parametrize("method", ["sqrtm", "eigh"])


@METHODS
def test_fid_of_a_set_with_itself_is_zero(method):
  features = np.random.default_rng(0).normal(size=(400, 32)) * 3 + 1
  mu, sigma = metrics.feature_statistics(features)
  # sqrtm(sigma @ sigma) = sigma up to rounding; trace(sigma) is about 300.
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6


@METHODS
def test_fid_matches_numpy_eigenvalues(method):
  rng = np.random.default_rng(1)
  d = 24
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
  # Independent route: s1 s2 is similar to a PSD matrix, so its eigenvalues are
  # real and >= 0 and tr sqrtm(s1 s2) = sum sqrt(eigvals(s1 s2)) (general LAPACK geev).
  trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
  got = metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-9)  # float64: agreement to rounding.


@METHODS
def test_fid_of_diagonal_gaussians_closed_form(method):
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  v1, v2 = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-12)  # float64 throughout.


def test_fid_rejects_mismatched_statistics():
  with pytest.raises(ValueError, match="Mismatched"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_float64_sums():
  x = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x)
  x64 = x.astype(np.float64)
  # EDM-style accumulation: (sum x x^T - N mu mu^T) / (N - 1).
  expected_mu = x64.sum(0) / len(x)
  expected_sigma = (x64.T @ x64 - len(x) * np.outer(expected_mu, expected_mu)) / (len(x) - 1)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)


def test_reference_stats_roundtrip(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = rng.normal(size=5), random_covariance(rng, 5)
  metrics.save_reference_stats(tmp_path / "ref.npz", mu, sigma)
  with np.load(tmp_path / "ref.npz") as raw:  # The file is plain EDM format.
    assert sorted(raw.files) == ["mu", "sigma"]
    np.testing.assert_array_equal(raw["mu"], mu)
  stats = metrics.load_reference_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(stats["sigma"], sigma)
  np.savez(tmp_path / "bad.npz", m=mu)
  with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
    metrics.load_reference_stats(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------
# Precision and recall.


def grid(n):
  """n x n integer grid points in row-major (y, x) order."""
  points = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1)
  return points.reshape(-1, 2).astype(float)


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_precision_recall_hand_computed(batch_size):
  # Real: 5x5 unit grid. k=3 radius^2: 2 at the 4 corners (1, 1, sqrt2), 1 elsewhere.
  real = grid(5)
  # Fake: rows y=0,1 of the grid shifted by (0.1, 0.1), plus the same 10 points far away.
  near = real[:10] + 0.1
  fake = np.concatenate([near, near + 100.0])
  # Precision: the 10 near points are within 0.02 of a real point, the far ones
  # of none -> 10 / 20. Fake radius^2: 2 at corners of the 2x5 block, else 1.
  # Recall: real rows y=0,1 (distance^2 0.02) and y=2 (0.81 + 0.01 <= 1 to the
  # row above) are covered; y=3 (1.9^2 > 2) and y=4 are not -> 15 / 25.
  precision, recall = metrics.precision_recall(real, fake, k=3, batch_size=batch_size)
  assert precision == 0.5 and recall == 0.6


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(130, 8))
  fake = rng.normal(size=(110, 8)) * 1.3 + 0.4
  k = 3

  def radii(x):  # Entry k of each sorted row of squared distances (entry 0: self).
    return np.sort(scipy.spatial.distance.cdist(x, x, "sqeuclidean"), axis=1)[:, k]

  d = scipy.spatial.distance.cdist(real, fake, "sqeuclidean")
  expected_precision = np.mean(np.any(d <= radii(real)[:, None], axis=0))
  expected_recall = np.mean(np.any(d <= radii(fake)[None, :], axis=1))
  got = metrics.precision_recall(real, fake, k=k, batch_size=32)
  # float32 distances: points exactly on a ball's boundary could flip; none are here.
  assert got == (expected_precision, expected_recall)
  assert 0 < expected_precision < 1 and 0 < expected_recall < 1  # Not a trivial case.


# ----------------------------------------------------------------------------
# Batched extraction (padding and order) with a stand-in feature function.


def test_extract_features_pads_and_keeps_order():
  images = np.random.default_rng(6).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
  calls = []

  def fake_fn(batch):
    calls.append(batch.shape[0])
    return batch.reshape(len(batch), -1).astype(np.float32)[:, :5]

  fake_fn.num_devices = 4
  got = fid.extract_features(images, fake_fn, batch_size=5)
  np.testing.assert_array_equal(got, images.reshape(11, -1)[:, :5])
  assert calls == [8, 8]  # 5 rounded up to a multiple of 4 devices; last batch padded.


@pytest.mark.parametrize("random_access", [True, False])
def test_tfds_source(monkeypatch, random_access):
  tfds = pytest.importorskip("tensorflow_datasets")
  # monkeypatch.context(): undone before mock_data exits, so mock_data restores the
  # real as_data_source (a test-wide setattr would reinstate the mock's after the test).
  with tfds.testing.mock_data(num_examples=5), monkeypatch.context() as patch:
    if not random_access:  # Datasets prepared as tfrecord have no data_source (patched
      # inside mock_data, which installs its own as_data_source).
      patch.setattr(tfds.core.DatasetBuilder, "as_data_source",
                    lambda *a, **k: (_ for _ in ()).throw(ValueError("no array_record")))
    images, labels = fid.load_images("tfds:cifar10:test")
    if random_access:  # The two mock APIs generate different images: read each its own way.
      source = tfds.data_source("cifar10", split="test")
      expected = np.stack([source[i]["image"] for i in range(5)])
    else:
      expected = np.stack([x["image"] for x in tfds.as_numpy(tfds.load("cifar10", split="test"))])
  assert labels is None and images.dtype == np.uint8
  np.testing.assert_array_equal(images, expected)


# ----------------------------------------------------------------------------
# Command line, with a random-weight Inception (8 CPU devices, one compile).


def run_cli(args):
  """tools.evaluate in this process (one compile for both calls)."""
  assert cli.invoke(evaluate_cli.main, "evaluate", evaluate_cli.FLAGS, args) == 0


def test_cli_writes_metrics(tmp_path, capsys):
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  folder = tmp_path / "real"
  folder.mkdir()
  for i, image in enumerate(images):
    PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")
  np.savez(tmp_path / "samples.npz", images=images, labels=np.arange(8))

  run_cli([f"--ref_from={folder}", f"--ref_out={tmp_path / 'ref.npz'}", "--save_features",
           "--inception=random", "--batch_size=8"])
  with np.load(tmp_path / "ref.npz") as ref:
    assert sorted(ref.files) == ["features", "mu", "sigma"]
    assert ref["features"].shape == (8, 2048) and ref["sigma"].shape == (2048, 2048)
  capsys.readouterr()

  run_cli([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}",
           "--inception=random", "--batch_size=8", f"--out={tmp_path / 'm.json'}",
           "--fid_method=eigh"])  # sqrtm of a singular 2048^2 matrix takes a minute.
  printed = json.loads(capsys.readouterr().out)
  written = json.loads((tmp_path / "m.json").read_text())
  assert printed == written
  assert {"fid", "precision", "recall", "num_samples", "inception", "fid_method"} <= set(written)
  assert "NOT FID" in written["inception"] and written["num_samples"] == 8
  assert "only 8 samples" in written["fid_warning"]       # 8 < 2048 features: reported
  assert fid.few_samples_warning(fid.MIN_FID_SAMPLES) is None
  # Samples are the reference images: every sample lies in its own ball and
  # vice versa, and the mean/covariance terms cancel (rank-8 covariances).
  assert written["precision"] == 1.0 and written["recall"] == 1.0
  assert abs(written["fid"]) < 1e-3 * np.trace(ref_sigma(tmp_path))


def ref_sigma(tmp_path):
  with np.load(tmp_path / "ref.npz") as ref:
    return ref["sigma"]
