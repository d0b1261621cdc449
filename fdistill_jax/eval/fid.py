r"""Sample-quality metrics: FID, precision and recall.

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to
Inception-v3 pool features of real and generated images, computed in float64
as NVlabs/edm `fid.py` and pytorch-fid do. Precision and recall follow
Kynkaenniemi et al. (2019) as implemented by the ADM evaluation suite
(openai/guided-diffusion `evaluations/evaluator.py`, `ManifoldEstimator`).
Reference statistics use EDM's `.npz` format (keys `mu`, `sigma`).

Command line:

  python -m fdistill_jax.evaluate --samples=samples.npz --ref=cifar10-32x32.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth
  python -m fdistill_jax.evaluate --ref_from=tfds:cifar10 --ref_out=cifar10-32x32.npz \
      --inception=inception-2015-12-05.pkl --save_features

It prints and writes JSON (FID; precision and recall when the reference has
features, i.e. real images or a --save_features npz). In a training loop:

  feature_fn = make_feature_fn(inception.load_variables(path))
  ref = load_reference_stats("cifar10-32x32.npz")
  fid = fid_from_samples(images, ref["mu"], ref["sigma"], feature_fn)
"""

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import scipy.linalg

from fdistill_jax import inception


# ----------------------------------------------------------------------------
# Frechet distance.


def feature_statistics(features):
  """Mean and covariance (unbiased, N-1) of `features` [N, D], in float64."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"feature_statistics expects features of shape [N >= 2, D], got "
                     f"{features.shape}; flatten the features and pass at least 2 rows.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_product(sigma1, sigma2, eps):
  """sqrtm(sigma1 @ sigma2) as pytorch-fid: retry with eps*I if it is not finite."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Rounding can leave tiny imaginary parts; large ones mean a broken input.
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary diagonal up to {max_imag:g}; "
                       "the covariances are not valid (symmetric PSD) statistics.")
    covmean = covmean.real
  return covmean


def _trace_sqrt_product_eigh(sigma1, sigma2):
  """tr sqrtm(sigma1 sigma2) = sum sqrt(eig(A sigma2 A)), A = sigma1^(1/2) (symmetric PSD)."""
  w, v = np.linalg.eigh(sigma1)
  root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root @ sigma2 @ root
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

  method="sqrtm" (default) is EDM's `fid.py` / pytorch-fid's
  `calculate_frechet_distance`: the principal square root from
  `scipy.linalg.sqrtm`, its `eps * I` retry when that is not finite, and its
  check on imaginary parts. method="eigh" computes the same trace from two
  symmetric eigendecompositions, tr sqrtm(s1 s2) = sum_i sqrt(lambda_i(s1^1/2
  s2 s1^1/2)) (the two products are similar matrices); it agrees to rounding
  for covariance matrices (7e-15 relative at D=2048 in our check),
  tolerates singular ones, and was 2.5x faster than sqrtm at D=2048 on CPU,
  which suits periodic evaluation.

  Args:
    mu1, mu2: mean vectors [D].
    sigma1, sigma2: covariance matrices [D, D].
    eps: diagonal offset used only if sqrtm of the plain product is not finite.
    method: "sqrtm" or "eigh".

  Returns:
    The distance as a Python float (this is FID when the statistics are
    Inception pool features).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                     f"vs {sigma2.shape}; expected mu [D] and sigma [D, D] from the same feature "
                     "extractor for both sets.")
  if method == "sqrtm":
    trace_sqrt = np.trace(_sqrtm_product(sigma1, sigma2, eps))
  elif method == "eigh":
    trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"Unknown method {method!r}; use 'sqrtm' (EDM / pytorch-fid) or 'eigh'.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------------
# Precision and recall (Kynkaenniemi et al., 2019; ADM ManifoldEstimator).


@jax.jit
def _squared_distances(x, y):
  """Pairwise squared Euclidean distances [n, m], clamped at zero (float32)."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  xx = jnp.sum(x * x, axis=1)[:, None]
  yy = jnp.sum(y * y, axis=1)[None, :]
  xy = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(xx - 2.0 * xy + yy, 0.0)


def _pad_rows(x, rows, value=0.0):
  """Pads `x` along axis 0 to `rows` rows with `value` (fixed shapes: one compile)."""
  pad = rows - x.shape[0]
  return x if pad == 0 else np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])


def _blocks(n, batch_size):
  return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


@functools.partial(jax.jit, static_argnums=2)
def _kth_distance(rows, points, k):
  """Entry k of each row's sorted squared distances to `points` (entry 0 is self)."""
  return -jax.lax.top_k(-_squared_distances(rows, points), k + 1)[0][:, k]


def manifold_radii(features, k=3, batch_size=1000):
  """Squared distance from each point to its k-th nearest neighbour (self excluded).

  As ADM's `ManifoldEstimator.manifold_radii`: entry k of each sorted row of
  squared distances, where entry 0 is the point itself. Memory is
  O(batch_size * N).
  """
  features = np.asarray(features, np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"Need more than k={k} points for k-NN radii, got {n}.")
  batch_size = min(batch_size, n)
  all_points = jnp.asarray(features)
  radii = [np.asarray(_kth_distance(_pad_rows(features[a:b], batch_size), all_points, k))[:b - a]
           for a, b in _blocks(n, batch_size)]
  return np.concatenate(radii)


@jax.jit
def _coverage_block(x, radii_x, y, radii_y):
  """For a block pair: is each x inside some y-ball, is each y inside some x-ball."""
  d = _squared_distances(x, y)
  x_in = jnp.any(d <= radii_y[None, :], axis=1)
  y_in = jnp.any(d <= radii_x[:, None], axis=0)
  return x_in, y_in


def _coverage(x, radii_x, y, radii_y, batch_size):
  """Boolean masks: x_i within some ball around y, y_j within some ball around x."""
  x_in, y_in = np.zeros(len(x), bool), np.zeros(len(y), bool)
  batch_size = min(batch_size, max(len(x), len(y)))
  for a, b in _blocks(len(x), batch_size):
    xb, rxb = _pad_rows(x[a:b], batch_size), _pad_rows(radii_x[a:b], batch_size, -1.0)
    for c, d in _blocks(len(y), batch_size):
      yb, ryb = _pad_rows(y[c:d], batch_size), _pad_rows(radii_y[c:d], batch_size, -1.0)
      xi, yi = _coverage_block(xb, rxb, yb, ryb)  # Padded radii of -1 cover nothing.
      x_in[a:b] |= np.asarray(xi)[:b - a]
      y_in[c:d] |= np.asarray(yi)[:d - c]
  return x_in, y_in


def precision_recall(real_features, fake_features, k=3, batch_size=1000):
  """Improved precision and recall (Kynkaenniemi et al., 2019, Sec. 2).

  Each set's manifold is the union of balls around its points with radius the
  distance to the point's k-th nearest neighbour in the same set. Precision
  is the fraction of fake points inside the real manifold; recall is the
  fraction of real points inside the fake manifold. Matches ADM's
  evaluator (k=3, boundary inclusive) except that distances are float32
  throughout (ADM tries float16 first).

  Args:
    real_features: [N, D] features of real images.
    fake_features: [M, D] features of generated images.
    k: neighbourhood size.
    batch_size: rows per distance block; memory is O(batch_size * max(N, M)).

  Returns:
    (precision, recall) as Python floats.
  """
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"Expected features [N, D] and [M, D], got {real.shape} and {fake.shape}.")
  real_radii = manifold_radii(real, k, batch_size)
  fake_radii = manifold_radii(fake, k, batch_size)
  real_in_fake, fake_in_real = _coverage(real, real_radii, fake, fake_radii, batch_size)
  return float(fake_in_real.mean()), float(real_in_fake.mean())


# ----------------------------------------------------------------------------
# EDM reference statistics (.npz with keys mu, sigma).


def save_reference_stats(path, mu, sigma, **extra):
  """Writes EDM-format reference statistics (`mu`, `sigma`, optional extras)."""
  with open(path, "wb") as f:
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_reference_stats(path):
  """Reads EDM-format reference statistics; returns a dict with `mu`, `sigma`, ...

  Pickled object arrays are refused (allow_pickle=False).
  """
  with np.load(path, allow_pickle=False) as data:
    stats = {key: data[key] for key in data.files}
  if "mu" not in stats or "sigma" not in stats:
    raise ValueError(f"{path} holds keys {sorted(stats)}, expected 'mu' and 'sigma' (EDM's "
                     "reference format); create one with --ref_from.")
  return stats


# ----------------------------------------------------------------------------
# Feature extraction: batched, jitted, sharded over all devices.


@functools.lru_cache(maxsize=None)
def _sharded_features(mode, devices):
  """One jitted, batch-sharded feature function per (mode, devices): compiled once."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(functools.partial(inception.features, mode=mode),
               in_shardings=(replicated, batch), out_shardings=batch)
  return fn, replicated


class FeatureFn:
  """Callable [B, H, W, 3] images -> [B, 2048] Inception features (jax.Array).

  The batch axis is sharded over a 1-D mesh ('data',) of `devices` (default:
  all of jax.devices()); B must be a multiple of `num_devices`
  (`extract_features` pads for you). Weights are replicated.
  """

  def __init__(self, variables, mode="tf", devices=None):
    """`variables` from `inception.load_variables`; `mode` "tf" or "pytorch_fid"."""
    devices = tuple(devices or jax.devices())
    self._fn, replicated = _sharded_features(mode, devices)
    self._variables = jax.device_put(variables, replicated)
    self.num_devices = len(devices)

  def __call__(self, images):
    return self._fn(self._variables, images)


def make_feature_fn(variables, mode="tf", devices=None):
  """`FeatureFn(variables, mode, devices)`: sharded, jitted Inception features."""
  return FeatureFn(variables, mode, devices)


def _batches(images, batch_size):
  """Yields fixed-size numpy batches (last one padded by repetition) and valid counts."""
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
    yield chunk, valid


def extract_features(images, feature_fn, batch_size=256):
  """Features [N, 2048] (float32 numpy) of N images, in fixed-shape batches.

  `images` is any indexable of NHWC images (an array, a memory-mapped npz
  member, ...); `batch_size` is rounded up to a multiple of the devices.
  """
  devices = getattr(feature_fn, "num_devices", 1)  # Plain callables: one device.
  batch_size = -(-min(batch_size, max(len(images), 1)) // devices) * devices
  out = [np.asarray(feature_fn(chunk))[:valid] for chunk, valid in _batches(images, batch_size)]
  if not out:
    raise ValueError("No images to evaluate: got an empty set.")
  return np.concatenate(out).astype(np.float32)


def fid_from_samples(images, ref_mu, ref_sigma, feature_fn, batch_size=256, method="eigh"):
  """FID of `images` (uint8 or [-1, 1] NHWC) against reference statistics.

  For periodic evaluation in the training loop: build `feature_fn` once with
  `make_feature_fn` and the reference with `load_reference_stats`. The
  default method="eigh" is the fast equivalent of EDM's sqrtm (see
  `frechet_distance`).
  """
  mu, sigma = feature_statistics(extract_features(images, feature_fn, batch_size))
  return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)


# ----------------------------------------------------------------------------
# Image sources: samples.npz, folders of PNGs, tfds datasets.


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _folder_images(path):
  paths = sorted(p for p in pathlib.Path(path).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
  if not paths:
    raise ValueError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) found under {path}.")
  return np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in paths])


def _tfds_images(spec):
  """'tfds:NAME[:SPLIT]' -> uint8 images of the whole split (default 'train').

  Uses `tfds.data_source` (random access, array_record datasets) and falls
  back to `tfds.load` for datasets prepared as tfrecord.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _, name, *rest = spec.split(":")
  split = rest[0] if rest else "train"
  try:
    source = tfds.data_source(name, split=split)
  except Exception:  # pylint: disable=broad-except  (no array_record files)
    batches = tfds.as_numpy(tfds.load(name, split=split, batch_size=1000))
    return np.concatenate([batch["image"] for batch in batches])
  return np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])


def load_images(spec):
  """Images (and labels or None) from an npz ('images'[, 'labels']), a folder, or tfds:NAME."""
  if spec.startswith("tfds:"):
    return _tfds_images(spec), None
  if pathlib.Path(spec).is_dir():
    return _folder_images(spec), None
  with np.load(spec, allow_pickle=False) as data:
    if "images" not in data.files:
      raise ValueError(f"{spec} holds {data.files}; expected an 'images' array (uint8 NHWC).")
    return data["images"], (data["labels"] if "labels" in data.files else None)


def _check_images(images, where):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: expected NHWC RGB images, got shape {images.shape}.")
  if images.dtype != np.uint8:
    raise ValueError(f"{where}: expected uint8 images in [0, 255], got {images.dtype}; "
                     "convert with (x * 127.5 + 128).clip(0, 255).astype(np.uint8).")
  return images


# ----------------------------------------------------------------------------
# Command line.

RANDOM_INCEPTION = "random"  # Tests only: a randomly initialised network, not FID.


def load_feature_fn(weights, mode="tf"):
  """`make_feature_fn` for a weight file, or for "random" (tests only)."""
  if weights == RANDOM_INCEPTION:
    return make_feature_fn(inception.random_variables(), mode)
  return make_feature_fn(inception.load_variables(weights), mode)


def reference_from_images(spec, feature_fn, batch_size=256, out=None, save_features=False):
  """Reference statistics (and features) of a folder, images npz or tfds:NAME[:SPLIT].

  Writes EDM-format statistics to `out` when given (`features` too if
  `save_features`). Returns {'mu', 'sigma', 'features'}.
  """
  images, _ = load_images(spec)
  features = extract_features(_check_images(images, spec), feature_fn, batch_size)
  mu, sigma = feature_statistics(features)
  if out:
    save_reference_stats(out, mu, sigma, **({"features": features} if save_features else {}))
  return {"mu": mu, "sigma": sigma, "features": features}


def _load_reference(spec, feature_fn, batch_size):
  """--ref: EDM statistics npz (maybe with features), or images to compute them from."""
  if not spec.startswith("tfds:") and not pathlib.Path(spec).is_dir():
    with np.load(spec, allow_pickle=False) as data:
      is_stats = "mu" in data.files
    if is_stats:
      return load_reference_stats(spec)
  return reference_from_images(spec, feature_fn, batch_size)


def evaluate(samples, ref, weights, mode="tf", batch_size=256, k=3, num_samples=None,
             method="sqrtm"):
  """FID (+ precision/recall when reference features exist) as a JSON-able dict."""
  feature_fn = load_feature_fn(weights, mode)
  images, _ = load_images(samples)
  images = _check_images(images[:num_samples], samples)
  features = extract_features(images, feature_fn, batch_size)
  reference = _load_reference(ref, feature_fn, batch_size)
  mu, sigma = feature_statistics(features)
  is_random = weights == RANDOM_INCEPTION
  result = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"], method=method),
            "num_samples": len(features), "samples": str(samples), "ref": str(ref),
            "inception": "random (tests only, NOT FID)" if is_random else str(weights),
            "preprocessing": mode, "fid_method": method}
  if "features" in reference:
    result["precision"], result["recall"] = precision_recall(reference["features"], features, k=k)
    result["num_ref"], result["k"] = len(reference["features"]), k
  return result


def _parser():
  p = argparse.ArgumentParser(prog="python -m fdistill_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--samples", help="samples.npz ('images' uint8 NHWC) or a folder of PNGs.")
  p.add_argument("--ref", help="EDM statistics npz (mu, sigma[, features]) or real images "
                 "(folder, images npz, tfds:NAME[:SPLIT]); features enable precision/recall.")
  p.add_argument("--inception", required=True,
                 help=f"Inception weights: {inception.SUPPORTED_FORMATS}; 'random' for tests.")
  p.add_argument("--ref_from", help="Compute reference statistics from a folder or "
                 "tfds:NAME[:SPLIT].")
  p.add_argument("--ref_out", help="Where --ref_from writes its EDM-format npz.")
  p.add_argument("--save_features", action="store_true", help="--ref_from also stores features.")
  p.add_argument("--out", help="JSON output (default: next to --samples).")
  p.add_argument("--preprocessing", default="tf", choices=sorted(inception.PREPROCESSING))
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--k", type=int, default=3, help="Neighbourhood size for precision/recall.")
  p.add_argument("--fid_method", default="sqrtm", choices=["sqrtm", "eigh"],
                 help="sqrtm: EDM / pytorch-fid; eigh: equivalent and faster.")
  p.add_argument("--num_samples", type=int, default=None, help="Use only the first N samples.")
  return p


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.ref_from:
    if not args.ref_out:
      raise SystemExit("--ref_from needs --ref_out=PATH.npz for the statistics.")
    feature_fn = load_feature_fn(args.inception, args.preprocessing)
    stats = reference_from_images(args.ref_from, feature_fn, args.batch_size, args.ref_out,
                                  args.save_features)
    print(json.dumps({"ref_out": args.ref_out, "num_images": len(stats["features"])}))
    return
  if not (args.samples and args.ref):
    raise SystemExit("Give --samples and --ref (or --ref_from and --ref_out); see --help.")
  result = evaluate(args.samples, args.ref, args.inception, args.preprocessing,
                    args.batch_size, args.k, args.num_samples, args.fid_method)
  out = args.out or str(pathlib.Path(args.samples).with_suffix("")) + "_metrics.json"
  pathlib.Path(out).write_text(json.dumps(result, indent=2))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
