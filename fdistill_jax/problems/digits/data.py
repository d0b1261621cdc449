"""scikit-learn's handwritten digits as a data source, with a fixed held-out split.

`sklearn.datasets.load_digits()`: 1,797 greyscale 8x8 images (UCI "Optical
Recognition of Handwritten Digits": 32x32 bitmaps counted in 4x4 blocks, so
each pixel is an integer 0..16), 10 classes, bundled with scikit-learn (nothing
is downloaded). Pixels map to [-1, 1] as x / 8 - 1 (the range every source
yields). The images are used at their native 8x8: upsampling would add no
information, only 4x the compute of every network (16x16), and an 8x8 DDPM++
U-Net (8 -> 4) still has two resolutions for the discriminator heads.

The split is fixed (seed `SPLIT_SEED`): 20% of each class is held out (359
images), the rest (1,438) trains the teacher, the distillation's GAN, and the
evaluation classifier. Measures compare samples with the held-out set.
"""

import functools

import numpy as np

from fdistill_jax.data import sources

RESOLUTION, CHANNELS, NUM_CLASSES = 8, 1, 10
MAX_VALUE = 16                  # pixel values are integers 0..16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout")


@functools.lru_cache(maxsize=1)
def _all_digits():
  """(images float32 [1797, 8, 8, 1] in [-1, 1], labels int64 [1797]), read-only."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this source needs it)
  digits = datasets.load_digits()
  images = (digits.images.astype(np.float32) * (2.0 / MAX_VALUE) - 1.0)[..., None]
  labels = digits.target.astype(np.int64)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


@functools.lru_cache(maxsize=1)
def split_indices():
  """{'train': indices, 'heldout': indices}: round(20%) of each class held out, seed 0."""
  _, labels = _all_digits()
  rng = np.random.Generator(np.random.PCG64(SPLIT_SEED))
  heldout = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    heldout.append(rng.permutation(members)[:int(round(len(members) * HELDOUT_FRACTION))])
  heldout = np.sort(np.concatenate(heldout))
  train = np.setdiff1d(np.arange(len(labels)), heldout)
  return {"train": train, "heldout": heldout}


def load(split="train"):
  """(images float32 [N, 8, 8, 1] in [-1, 1], labels int64 [N]) of one split."""
  if split not in SPLITS:
    raise ValueError(f"digits split {split!r}; expected one of {SPLITS}.")
  images, labels = _all_digits()
  idx = split_indices()[split]
  return images[idx], labels[idx]


def make_source(data_config) -> sources.IndexedSource:
  """`data.kind='digits'`: the `data.split` split ('train' or 'heldout'), order `data.seed`."""
  common = sources.common_fields(data_config)
  split = sources.field(data_config, "split", "train")
  want = (RESOLUTION, RESOLUTION, CHANNELS)
  if common["image_shape"] != want:
    raise ValueError(f"data.kind='digits' has native {RESOLUTION}x{RESOLUTION} greyscale images; "
                     f"set data.resolution={RESOLUTION} and data.channels={CHANNELS} (got "
                     f"{common['image_shape'][0]} and {common['image_shape'][2]}).")
  if common["num_classes"] not in (0, NUM_CLASSES):
    raise ValueError(f"data.kind='digits' has {NUM_CLASSES} classes; set data.num_classes="
                     f"{NUM_CLASSES} (or 0: unconditional), not {common['num_classes']}.")
  images, labels = load(split)
  return sources.IndexedSource(lambda idx: (images[idx], labels[idx]),
                               num_examples=len(images), name=f"digits ({split})", **common)
