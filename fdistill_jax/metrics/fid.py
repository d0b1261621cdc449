r"""FID: Inception-v3 features of images, their statistics, and whole evaluations.

FID (Heusel et al., 2017) is the Frechet distance (`eval.metrics`) between
Gaussians fitted to Inception-v3 pool features of real and generated images;
precision and recall use the same features. Reference statistics use EDM's
`.npz` format (keys `mu`, `sigma`, optionally `features`). The command line is
`python -m fdistill_jax.tools.evaluate`. In a training loop:

  feature_fn = make_feature_fn(inception_weights.load_variables(path))
  ref = metrics.load_reference_stats("cifar10-32x32.npz")
  fid = fid_from_samples(images, ref["mu"], ref["sigma"], feature_fn)
"""

import functools
import logging
import pathlib

import jax
import numpy as np
import PIL.Image

from fdistill_jax import console
from fdistill_jax.data import tfds as tfds_data
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.io import limits
from fdistill_jax.loaders import inception as inception_weights
from fdistill_jax.models import inception
from fdistill_jax.pipelines import sharded


# ----------------------------------------------------------------------------
# Feature extraction: batched, jitted, sharded over all devices.


@functools.lru_cache(maxsize=None)
def _sharded_features(mode, devices):
  """One jitted, batch-sharded feature function per (mode, devices): compiled once."""
  return sharded.ShardedFn(functools.partial(inception.features, mode=mode), devices=devices)


class FeatureFn:
  """Callable [B, H, W, 3] images -> [B, 2048] Inception features (jax.Array).

  The batch axis is sharded over a 1-D mesh ('data',) of `devices` (default:
  all of jax.devices()) by `pipelines.sharded.ShardedFn`; B must be a multiple
  of `num_devices` (`extract_features` pads for you). Weights are replicated.
  """

  def __init__(self, variables, mode="tf", devices=None):
    """`variables` from `inception_weights.load_variables`; `mode` "tf" or "pytorch_fid"."""
    self._fn = _sharded_features(mode, tuple(devices or jax.devices()))
    self._variables = self._fn.replicate(variables)
    self.num_devices = self._fn.num_devices

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


def extract_features(images, feature_fn, batch_size=256, what="Inception features"):
  """Features [N, 2048] (float32 numpy) of N images, in fixed-shape batches.

  `images` is any indexable of NHWC images (an array, a memory-mapped npz
  member, ...); `batch_size` is rounded up to a multiple of the devices.
  Progress lines ('what: done / N (rate/s, ETA)') go to the console.
  """
  devices = getattr(feature_fn, "num_devices", 1)  # Plain callables: one device.
  batch_size = sharded.round_up(min(batch_size, len(images)), devices)
  progress, out, done = console.Counter(what, len(images)), [], 0
  for chunk, valid in _batches(images, batch_size):
    out.append(np.asarray(feature_fn(chunk))[:valid])
    done += valid
    progress(done)
  if not out:
    raise ValueError("No images to evaluate: got an empty set.")
  return np.concatenate(out).astype(np.float32)


# Inception's feature dimension: with fewer samples the covariance is singular and FID is
# strongly biased upwards (published FIDs use 50,000 samples).
MIN_FID_SAMPLES = 2048
_LOG = logging.getLogger(__name__)


def few_samples_warning(num):
  """The warning (also logged) for an FID of `num` < MIN_FID_SAMPLES samples; else None."""
  if num >= MIN_FID_SAMPLES:
    return None
  message = (f"FID of only {num} samples (< {MIN_FID_SAMPLES}, Inception's feature dimension): "
             "the covariance is singular and the value strongly biased upwards; it is not "
             "comparable with published FIDs (50,000 samples).")
  _LOG.warning("%s", message)
  return message


def fid_from_samples(images, ref_mu, ref_sigma, feature_fn, batch_size=256, method="eigh"):
  """FID of `images` (uint8 or [-1, 1] NHWC) against reference statistics.

  For periodic evaluation in the training loop: build `feature_fn` once with
  `make_feature_fn` and the reference with `load_reference_stats`. The
  default method="eigh" is the fast equivalent of EDM's sqrtm (see
  `frechet_distance`).
  """
  features = extract_features(images, feature_fn, batch_size, what="FID: Inception features")
  mu, sigma = metrics.feature_statistics(features)
  return metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)


# ----------------------------------------------------------------------------
# Image sources: samples.npz, folders of PNGs, tfds datasets.


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


MAX_IMAGE_SIDE = 4096    # folder images: larger ones are refused before decoding


def _read_image(path, size=None):
  """RGB uint8 pixels of one image file; its size is checked before decoding."""
  try:
    with PIL.Image.open(path) as im:
      if max(im.size) > MAX_IMAGE_SIDE or (size is not None and im.size != size):
        raise ValueError(f"{path}: image is {im.size[0]}x{im.size[1]}; expected "
                         f"{'%dx%d' % size if size else f'at most {MAX_IMAGE_SIDE} per side'} "
                         "like the other images of the folder.")
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot decode the image ({str(e)[:200]}): the file is corrupt "
                     "or truncated.") from None


def _folder_images(path):
  paths = sorted(p for p in pathlib.Path(path).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
  if not paths:
    raise ValueError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) found under {path}.")
  first = _read_image(paths[0])
  size = (first.shape[1], first.shape[0])
  return np.stack([first] + [_read_image(p, size) for p in paths[1:]])


def load_images(spec):
  """Images (and labels or None) from an npz ('images'[, 'labels']), a folder, or tfds:NAME."""
  if spec.startswith("tfds:"):
    return tfds_data.read_images(spec), None
  if pathlib.Path(spec).is_dir():
    return _folder_images(spec), None
  data = limits.load_npz(spec, keys=("images", "labels"))   # headers checked first
  if "images" not in data:
    raise ValueError(f"{spec} holds {limits.npz_keys(spec)}; expected an 'images' array "
                     "(uint8 NHWC).")
  return data["images"], data.get("labels")


def _check_images(images, where):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: expected NHWC RGB images, got shape {images.shape}.")
  if images.dtype != np.uint8:
    raise ValueError(f"{where}: expected uint8 images in [0, 255], got {images.dtype}; "
                     "convert with (x * 127.5 + 128).clip(0, 255).astype(np.uint8).")
  return images


# ----------------------------------------------------------------------------
# Whole evaluations (the `evaluate` command and periodic FID).

RANDOM_INCEPTION = "random"  # Tests only: a randomly initialised network, not FID.


def load_feature_fn(weights, mode="tf"):
  """`make_feature_fn` for a weight file, or for "random" (tests only)."""
  if weights == RANDOM_INCEPTION:
    return make_feature_fn(inception_weights.random_variables(), mode)
  console.say("Loading Inception weights %s (the first batch compiles the network) ...", weights)
  return make_feature_fn(inception_weights.load_variables(weights), mode)


def reference_from_images(spec, feature_fn, batch_size=256, out=None, save_features=False):
  """Reference statistics (and features) of a folder, images npz or tfds:NAME[:SPLIT].

  Writes EDM-format statistics to `out` when given (`features` too if
  `save_features`). Returns {'mu', 'sigma', 'features'}.
  """
  images, _ = load_images(spec)
  features = extract_features(_check_images(images, spec), feature_fn, batch_size,
                              what="Inception features of the reference images")
  mu, sigma = metrics.feature_statistics(features)
  if out:
    metrics.save_reference_stats(out, mu, sigma, **({"features": features} if save_features else {}))
  return {"mu": mu, "sigma": sigma, "features": features}


def _reference_stats_file(spec):
  """The checked statistics when --ref is an EDM statistics npz; None for images."""
  if not spec.startswith("tfds:") and not pathlib.Path(spec).is_dir():
    if "mu" in limits.npz_keys(spec):
      return metrics.load_reference_stats(spec)
  return None


def evaluate(samples, ref, weights, mode="tf", batch_size=256, k=3, num_samples=None,
             method="sqrtm"):
  """FID (+ precision/recall when reference features exist) as a JSON-able dict.

  Cheap checks come first: the reference statistics (finite, symmetric, PSD)
  and the sample file are read and checked before any network runs.
  """
  if num_samples is not None and num_samples <= 0:
    raise ValueError(f"--num_samples={num_samples} must be positive (or left unset for all).")
  reference = _reference_stats_file(ref)
  images, _ = load_images(samples)
  images = _check_images(images[:num_samples], samples)
  feature_fn = load_feature_fn(weights, mode)
  features = extract_features(images, feature_fn, batch_size,
                              what="Inception features of the samples")
  if reference is None:
    reference = reference_from_images(ref, feature_fn, batch_size)
  mu, sigma = metrics.feature_statistics(features)
  console.say("Frechet distance of %d samples (%s) ...", len(features), method)
  is_random = weights == RANDOM_INCEPTION
  result = {"fid": metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"], method=method),
            "num_samples": len(features), "samples": str(samples), "ref": str(ref),
            "inception": "random (tests only, NOT FID)" if is_random else str(weights),
            "preprocessing": mode, "fid_method": method}
  warning = few_samples_warning(len(features))
  if warning:
    result["fid_warning"] = warning
  if "features" in reference:
    console.say("Precision and recall (k=%d, %d reference x %d sample features) ...", k,
                len(reference["features"]), len(features))
    result["precision"], result["recall"] = metrics.precision_recall(reference["features"], features, k=k)
    result["num_ref"], result["k"] = len(reference["features"]), k
  return result
