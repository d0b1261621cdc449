"""EDM's dataset format: the output of EDM's dataset_tool.py.

A zip file or a folder of images (searched recursively) with an optional
dataset.json holding {"labels": [[relative file name, integer class], ...]}
or {"labels": null}.
"""

import io
import json
import os
import threading
import zipfile

import numpy as np
import PIL.Image

from fdistill_jax.data import sources

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

  def read(self, name: str) -> bytes:
    if os.path.isdir(self.path):
      with open(os.path.join(self.path, name), "rb") as f:
        return f.read()
    return self._zip().read(name)


def _edm_labels(files: _EdmFiles, num_classes: int) -> np.ndarray:
  """Integer labels in file order from dataset.json, checked."""
  where = f"EDM dataset {files.path}"
  raw = (json.loads(files.read("dataset.json")).get("labels")
         if "dataset.json" in files.names else None)
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

  def read_one(i):
    name = files.images[i]
    with PIL.Image.open(io.BytesIO(files.read(name))) as im:
      image = np.asarray(im)
    image = sources.check_image(image, common["image_shape"], f"{path}/{name}")
    return image, labels[i]

  read = sources.batch_reader(read_one, len(files.images), config)
  return sources.IndexedSource(read, num_examples=len(files.images),
                       name=f"EDM dataset {path}", **common)

