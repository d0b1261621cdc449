"""TFDS datasets, read by random access (`tfds.data_source`, no TensorFlow needed).

`open_split` is the project's one TFDS reader: the training source
(`tfds_source`) and the evaluation's `tfds:NAME[:SPLIT]` images
(`read_images`) both use it. Datasets must be prepared in the array_record
format; a split prepared only as tfrecord is read once into memory through
`tfds.load` (which needs TensorFlow), with a warning.
"""

import logging

import numpy as np

from fdistill_jax.data import sources

BUILD_HINT = (
    "Prepare it once (needs network; tfds 4.9.10 on Python >= 3.9 also needs "
    "`pip install importlib_resources`) with\n"
    "  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
    "or in Python\n"
    "  tfds.builder('{name}', data_dir='{data_dir}', "
    "file_format='array_record').download_and_prepare()\n"
    "and point config.data.data_dir at that directory.")


class _LoadedSplit:
  """A split prepared as tfrecord, read whole into memory through `tfds.load`."""

  def __init__(self, examples):
    self._examples = examples

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, i):
    return self._examples[i]


def _load_in_memory(name, split, data_dir, first_error):
  """Falls back to `tfds.load` (TensorFlow) for tfrecord-prepared splits.

  Never downloads (`download=False`): on a pod every process would fetch the
  dataset at once; an unprepared split gets the error saying how to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  hint = BUILD_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
  try:
    examples = list(tfds.as_numpy(
        tfds.load(name, split=split, data_dir=data_dir, download=False)))
  except Exception as e:  # pylint: disable=broad-except  (not prepared at all)
    said = (str(first_error).splitlines() or [""])[0]
    raise FileNotFoundError(
        f"TFDS dataset {name!r} split {split!r} is not prepared under data_dir="
        f"{data_dir!r} (tfds said: {type(first_error).__name__}: {said}).\n{hint}") from e
  logging.warning("TFDS %s[%s] has no array_record files; read it whole into memory "
                  "through tfds.load. Prepare it with --file_format=array_record for "
                  "random access.", name, split)
  return _LoadedSplit(examples)


def open_split(name: str, split: str = "train", data_dir=None):
  """(builder, random-access split) of a TFDS dataset, or an error saying how to prepare it.

  The split supports `len()` and `split[i]` -> {feature: numpy value}.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f"TFDS dataset {name!r} is unknown to tfds "
                            f"{tfds.__version__}. Check the dataset name.") from e
  try:
    return builder, builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several types)
    return builder, _load_in_memory(name, split, data_dir, e)


def parse_spec(spec: str):
  """'tfds:NAME[:SPLIT]' -> (NAME, SPLIT), split defaulting to 'train'."""
  _, name, *rest = spec.split(":")
  return name, (rest[0] if rest else "train")


def read_images(spec: str, image_key: str = "image") -> np.ndarray:
  """All images of 'tfds:NAME[:SPLIT]' as one uint8 array (evaluation references)."""
  name, split = parse_spec(spec)
  _, ds = open_split(name, split)
  return np.stack([np.asarray(ds[i][image_key]) for i in range(len(ds))])


def tfds_source(config) -> sources.IndexedSource:
  """Source over a TFDS dataset, e.g. 'cifar10', 'imagenet_resized/64x64'."""
  common = sources.common_fields(config)
  name, split = sources.field(config, "name"), sources.field(config, "split", "train")
  image_key = sources.field(config, "image_key", "image")
  label_key = sources.field(config, "label_key", "label")
  data_dir = sources.field(config, "data_dir", None) or None
  builder, ds = open_split(name, split, data_dir)
  where = f"tfds {name}[{split}]"
  shape = builder.info.features[image_key].shape
  if None not in shape:
    sources.check_image(np.zeros(shape, np.uint8), common["image_shape"], where)
  if common["num_classes"]:
    have = builder.info.features[label_key].num_classes
    if have != common["num_classes"]:
      raise ValueError(
          f"{where}: labels lie in [0, {have}) but data.num_classes="
          f"{common['num_classes']}; set num_classes={have} (or 0 for "
          "unconditional training).")

  def read_one(i):
    example = ds[i]
    image = sources.check_image(np.asarray(example[image_key]),
                                common["image_shape"], f"{where} example {i}")
    return image, int(example[label_key]) if common["num_classes"] else 0

  read = sources.batch_reader(read_one, len(ds), config)
  return sources.IndexedSource(read, num_examples=len(ds), name=where, **common)

