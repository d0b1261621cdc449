"""EDM's dataset format: the output of EDM's dataset_tool.py.

A zip file or a folder of images (searched recursively) with an optional
dataset.json holding {"labels": [[relative file name, integer class], ...]}
or {"labels": null}.

Nothing in the files is trusted: an image's size is checked against the
config before it is decoded (no decompression bombs), a zip member's declared
size before it is inflated, and 8-bit grayscale / RGB images are used as they
are; 16-bit grayscale is scaled to 8 bits (round(x * 255 / 65535)), 1-bit
becomes 0 / 255 (Pillow itself reads 16-bit RGB PNGs as 8-bit, keeping the
high byte), and any other mode is refused. A corrupt or truncated image stops
the run with its name, unless `data.skip_unreadable=True`: then it is skipped
(the next readable example takes its place) and counted in the log.
"""

import io
import json
import logging
import os
import threading
import zipfile

import numpy as np
import PIL.Image

from fdistill_jax.data import sources
from fdistill_jax.io import limits

MAX_IMAGE_BYTES = 256 * 2**20          # one image file
MAX_LABELS_BYTES = 2**30               # dataset.json (ImageNet's is ~50 MB)
_LOG = logging.getLogger(__name__)


class UnreadableImage(ValueError):
  """An image file cannot be decoded (corrupt, truncated, or not an image)."""

BUILD_HINT = (
    "Create it with EDM's dataset_tool.py, e.g.\n"
    "  python dataset_tool.py "
    "--source=downloads/cifar10/cifar-10-python.tar.gz "
    "--dest=datasets/cifar10-32x32.zip\n"
    "and point config.data.path at the zip file or folder it writes.")


# ----------------------------------------------------------------------------
# EDM dataset_tool.py output: zip or folder of images plus dataset.json.


class _EdmFiles:
  """Random access to the files of an EDM dataset (zip or folder)."""

  def __init__(self, path: str):
    self.path = path
    self._local = threading.local()
    if os.path.isdir(path):
      names = [os.path.relpath(os.path.join(root, f), path).replace("\\", "/")
               for root, _, files in os.walk(path) for f in files]
    elif zipfile.is_zipfile(path):
      names = self._zip().namelist()
    else:
      raise FileNotFoundError(
          f"EDM dataset not found: {path!r} is neither a folder nor a zip "
          f"file.\n{BUILD_HINT}")
    exts = set(PIL.Image.registered_extensions())
    self.names = set(names)
    self.images = sorted(n for n in names
                         if os.path.splitext(n)[1].lower() in exts)

  def _zip(self) -> zipfile.ZipFile:
    if getattr(self._local, "zip", None) is None:  # One handle per thread.
      self._local.zip = zipfile.ZipFile(self.path)
    return self._local.zip

  def read(self, name: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The file's bytes; its (declared) size is checked against `limit` first."""
    if os.path.isdir(self.path):
      file = os.path.join(self.path, name)
      size = os.path.getsize(file)
    else:
      size = self._zip().getinfo(name).file_size
    if size > limit:
      raise UnreadableImage(f"{self.path}/{name} has {size:,} bytes (limit {limit:,}): not a "
                            "dataset file of this format.")
    if os.path.isdir(self.path):
      with open(file, "rb") as f:
        return f.read(limit + 1)[:limit]
    where = f"{self.path}/{name}"
    try:     # inflated in pieces, never past the declared (checked) size
      return limits.read_zip_member(self._zip(), name, limits.Budget(limit, where))
    except limits.ResourceLimitError as e:
      raise UnreadableImage(f"{where}: {e}") from None


def _labels_json(files: _EdmFiles):
  """The 'labels' list of dataset.json (or None), checked; errors name the file."""
  where = f"{files.path}/dataset.json"
  try:
    raw = limits.json_loads(files.read("dataset.json", MAX_LABELS_BYTES), where,
                            max_bytes=MAX_LABELS_BYTES)
  except ValueError as e:
    raise ValueError(f"{e}; rebuild it with dataset_tool.py.") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{where} must hold a JSON object {{\"labels\": [[file, class], ...]}}, "
                     f"got a {type(raw).__name__}.")
  labels = raw.get("labels")
  if labels is not None and not isinstance(labels, list):
    raise ValueError(f"{where}: 'labels' must be a list of [file name, class] pairs or null.")
  for i, pair in enumerate(labels or ()):
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
            and type(pair[1]) is int):
      raise ValueError(f"{where}: labels entry {i} is {str(pair)[:80]}; expected [file name, "
                       "integer class].")
  return labels


def _edm_labels(files: _EdmFiles, num_classes: int) -> np.ndarray:
  """Integer labels in file order from dataset.json, checked."""
  where = f"EDM dataset {files.path}"
  raw = _labels_json(files) if "dataset.json" in files.names else None
  if raw is None:
    raise ValueError(
        f"{where} has no labels (dataset.json missing or labels null) but "
        f"data.num_classes={num_classes}. Set num_classes=0 for unconditional "
        "training, or rebuild the dataset from labelled data.")
  table = {str(k).replace("\\", "/"): v for k, v in raw}
  missing = [n for n in files.images if n not in table]
  if missing:
    raise ValueError(f"{where}: dataset.json has no label for {missing[:3]} "
                     f"({len(missing)} files). Rebuild it with "
                     "dataset_tool.py.")
  labels = np.array([table[n] for n in files.images])
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must be integer classes, got label "
                     f"vectors of shape {labels.shape[1:]}.")
  sources.check_labels(labels, num_classes, where)
  return labels.astype(np.int64)


def edm_source(config) -> sources.IndexedSource:
  """Source over EDM's dataset format (see the module docstring)."""
  common = sources.common_fields(config)
  path = os.path.expanduser(str(sources.field(config, "path") or ""))
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"EDM dataset not found at {path!r}.\n"
                            f"{BUILD_HINT}")
  files = _EdmFiles(path)
  if not files.images:
    raise FileNotFoundError(f"No image files in {path!r}.\n{BUILD_HINT}")
  labels = (_edm_labels(files, common["num_classes"])
            if common["num_classes"] else np.zeros(len(files.images), np.int64))

  skip = bool(sources.field(config, "skip_unreadable", False))
  skipped, lock = set(), threading.Lock()

  def read_one(i):
    for j in range(i, i + len(files.images)):      # with skip: the next readable example
      name = files.images[j % len(files.images)]
      try:
        image = decode_image(files.read(name), common["image_shape"], f"{path}/{name}")
        return image, labels[j % len(files.images)]
      except UnreadableImage as e:
        if not skip:
          raise
        with lock:
          if name not in skipped:
            skipped.add(name)
            _LOG.warning("Skipping unreadable image (%d so far; data.skip_unreadable=True): "
                         "%s", len(skipped), e)
    raise UnreadableImage(f"{path}: no image of the dataset could be read.")

  read = sources.batch_reader(read_one, len(files.images), config)
  return sources.IndexedSource(read, num_examples=len(files.images),
                       name=f"EDM dataset {path}", **common)



def _to_uint8(im: PIL.Image.Image, where: str) -> np.ndarray:
  """uint8 pixels of an 8-bit, 16-bit grayscale or 1-bit image (module docstring)."""
  if im.mode in ("L", "RGB"):
    return np.asarray(im)
  if im.mode == "1":
    return np.asarray(im.convert("L"))
  if im.mode.startswith("I;16"):
    x = np.asarray(im).astype(np.uint32)
    return ((x * 255 + 32767) // 65535).astype(np.uint8)
  raise UnreadableImage(f"{where}: image mode {im.mode!r} is not supported (8-bit L or RGB, "
                        "16-bit grayscale); convert the dataset to 8-bit RGB.")


def decode_image(data: bytes, image_shape, where: str) -> np.ndarray:
  """uint8 [H, W, C] pixels of an image file, its size checked before decoding.

  Raises:
    UnreadableImage: the bytes are not a decodable image of a supported mode.
    ValueError: the image's size or channels differ from `image_shape`.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      if tuple(im.size[::-1]) != tuple(image_shape[:2]):
        size = (im.size[1], im.size[0], len(im.getbands()))
      else:
        size = None
        image = _to_uint8(im, where)
  except UnreadableImage:
    raise
  except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as e:
    raise UnreadableImage(f"{where}: cannot decode the image ({str(e)[:200]}): the file is "
                          "corrupt or truncated. Rebuild the dataset, or set "
                          "--config.data.skip_unreadable=True to skip such files.") from None
  if size is not None:   # the same message as sources.check_image, before decoding
    raise ValueError(f"{where}: image has shape {size} (H, W, C) but the config expects "
                     f"{tuple(image_shape)} (data.resolution={image_shape[0]}); resize the "
                     "dataset or fix the config.")
  return sources.check_image(image, image_shape, where)
