r"""COCO-2014 zero-shot evaluation data: prompts, the FID resize protocol, sample files.

The protocol is DMD2's (Yin et al., 2024; tianweiy/DMD2 `main/coco_eval/coco_evaluator.py`
and `main/test_folder_sd.py`), which takes it from GigaGAN's evaluation (Kang et al.,
2023, mingukkang/GigaGAN `evaluation/`), the protocol behind the COCO-30k numbers that
f-distill's Table 4 compares with DMD2:

* Prompts: N = 30k captions of COCO val2014, one per image (the COCO-30k convention: 30k
  val2014 images, for each one of its ~5 captions at random). DMD2 ships its own draw as a
  text file (`main/coco_eval/captions_coco14_test.txt`, one prompt per line): to use exactly
  those prompts, generate from that file. `choose_captions` makes a fresh draw,
  deterministic in a seed: a seeded permutation of the sorted image ids, then one seeded
  caption index per chosen image.
* Resize before Inception (`RESIZE_PROTOCOLS`, default "dmd2"), the same for generated and
  reference images: centre-crop the square of the shorter side (torchvision's
  `center_crop`, offset int(round((h - s) / 2))), PIL LANCZOS resize to `eval_res` = 256
  (uint8), then clean-fid's "clean" resize to 299 (Parmar et al., 2022: PIL BICUBIC on each
  channel as float32, clipped to [0, 255]) and the Inception TF graph. Our Inception takes
  uint8-range pixels, so the 299 image is rounded to integers (at most half a grey level;
  the only deviation from clean-fid). "inception" skips all of it: the network's own
  bilinear resize of the image as it is (EDM's protocol for small images).
* Reference: DMD2 points `--ref_dir` at the whole val2014 image folder (40,504 images);
  `image_source` reads a folder lazily (COCO images have many sizes) or tfds
  `coco_captions`, whose Karpathy splits val + restval + test are exactly val2014.

Samples: an npz with `images` (uint8 NHWC), `prompts` (strings) and `prompt_index` (image
i was generated from prompts[prompt_index[i]]), as `tools.sample_t2i` writes it.
"""

import concurrent.futures
import io
import os
import pathlib
import zipfile

import numpy as np
import PIL.Image

from fdistill_jax import console
from fdistill_jax.data import tfds as tfds_data
from fdistill_jax.metrics import fid
from fdistill_jax.io import limits

EVAL_RES = 256                 # DMD2's --eval_res / GigaGAN's
INCEPTION_RES = 299
# tfds coco_captions holds COCO 2014 in Karpathy's splits; these three are val2014.
TFDS_COCO = "tfds:coco_captions:val+restval+test"
MAX_ANNOTATION_BYTES = 2**30


# ----------------------------------------------------------------------------
# The resize protocol (PIL, deterministic).


def center_crop_square(image: np.ndarray) -> np.ndarray:
  """The centred s x s square, s = min(h, w), offsets as torchvision's `center_crop`."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
  return image[top:top + s, left:left + s]


def crop_resize(image: np.ndarray, size: int = EVAL_RES) -> np.ndarray:
  """uint8 [size, size, 3]: square centre crop, PIL LANCZOS (DMD2's `resize_and_center_crop`)."""
  im = PIL.Image.fromarray(center_crop_square(np.asarray(image, np.uint8)))
  return np.asarray(im.resize((size, size), PIL.Image.Resampling.LANCZOS))


def clean_resize(image: np.ndarray, size: int = INCEPTION_RES) -> np.ndarray:
  """float32 [size, size, C] in [0, 255]: clean-fid's "clean" resize (PIL BICUBIC per channel
  on float32 'F' images)."""
  channels = [np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32))
                         .resize((size, size), PIL.Image.Resampling.BICUBIC))
              for c in range(image.shape[-1])]
  return np.clip(np.stack(channels, axis=-1), 0, 255)


def _dmd2(image, eval_res):
  return np.rint(clean_resize(crop_resize(image, eval_res))).astype(np.uint8)


RESIZE_PROTOCOLS = {"dmd2": _dmd2, "inception": lambda image, eval_res: image}


def host_map(fn, items) -> list:
  """[fn(x) for x in items] on a thread pool of the host's cores (PIL resizes release the GIL)."""
  items = list(items)
  if len(items) < 2:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool:
    return list(pool.map(fn, items))


class Resized:
  """Lazy `images` through a resize protocol: len() and [start:stop] -> uint8 NHWC batches.

  `images` is any indexable of HWC uint8 images (an array, an npz member, `image_source`).
  Only the requested slice is decoded and resized (on all host cores), so 30k images never
  sit in memory at 299.
  """

  def __init__(self, images, protocol: str = "dmd2", eval_res: int = EVAL_RES):
    if protocol not in RESIZE_PROTOCOLS:
      raise ValueError(f"unknown resize protocol {protocol!r}; choose one of "
                       f"{sorted(RESIZE_PROTOCOLS)}.")
    self._images, self._fn, self._res = images, RESIZE_PROTOCOLS[protocol], eval_res

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    if not isinstance(index, slice):
      return self._fn(np.asarray(self._images[index]), self._res)
    return np.stack(host_map(lambda i: self._fn(np.asarray(self._images[i]), self._res),
                             range(*index.indices(len(self)))))


# ----------------------------------------------------------------------------
# Reference images: a folder (any sizes), or tfds coco_captions.


class _FolderImages:
  """The sorted image files under a folder, decoded one at a time (RGB uint8)."""

  def __init__(self, folder):
    self.paths = sorted(p for p in pathlib.Path(folder).rglob("*")
                        if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not self.paths:
      raise ValueError(f"no .png/.jpg/.jpeg images found under {folder}: point --ref_images at "
                       "the COCO val2014 folder.")

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return fid._read_image(self.paths[i])  # pylint: disable=protected-access  (size-checked decode)


class _TfdsImages:
  """Images of one or more tfds splits ('val+restval+test'), by random access."""

  def __init__(self, spec, data_dir=None):
    name, splits = tfds_data.parse_spec(spec)
    self._parts = [tfds_data.open_split(name, split, data_dir)[1] for split in splits.split("+")]
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, i):
    part = int(np.searchsorted(self._starts, i, side="right")) - 1
    return np.asarray(self._parts[part][i - int(self._starts[part])]["image"])


def image_source(spec: str, data_dir=None, num=None):
  """Lazy reference images of a folder or 'tfds:NAME[:SPLIT+SPLIT]' (the first `num`)."""
  if spec.startswith("tfds:"):
    images = _TfdsImages(spec, data_dir)
  elif pathlib.Path(spec).is_dir():
    images = _FolderImages(spec)
  else:
    raise FileNotFoundError(f"--ref_images={spec} is neither a folder of images nor "
                            "tfds:coco_captions[:SPLITS].")
  if num is not None and not 0 < num <= len(images):
    raise ValueError(f"--num={num} reference images requested; {spec} holds {len(images)}.")
  return images if num is None else _First(images, num)


class _First:
  def __init__(self, images, num):
    self._images, self._num = images, num

  def __len__(self):
    return self._num

  def __getitem__(self, i):
    return self._images[i]


# ----------------------------------------------------------------------------
# Prompts: captions_val2014.json or tfds coco_captions -> N captions, one per image.


def _clean(caption: str) -> str:
  return " ".join(caption.split())  # one line: newlines and runs of spaces collapse


def pairs_from_annotations(path) -> list:
  """[(image_id, caption)] of a COCO captions file ({"annotations": [{"image_id", "caption"}]})."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{path} does not exist; expected COCO's captions_val2014.json.")
  data = limits.json_load(p, f"{path} (COCO captions)", max_bytes=MAX_ANNOTATION_BYTES)
  records = data.get("annotations") if isinstance(data, dict) else None
  if not isinstance(records, list):
    raise ValueError(f"{path} has no 'annotations' list; expected COCO's captions_val2014.json "
                     'format {"annotations": [{"image_id": ..., "caption": ...}]}.')
  pairs = []
  for n, r in enumerate(records):
    if not (isinstance(r, dict) and isinstance(r.get("image_id"), int)
            and isinstance(r.get("caption"), str)):
      raise ValueError(f"{path}: annotation {n} is {str(r)[:100]}; each needs an integer "
                       "'image_id' and a string 'caption'.")
    pairs.append((r["image_id"], _clean(r["caption"])))
  return pairs


def pairs_from_tfds(spec: str = TFDS_COCO, data_dir=None) -> list:
  """[(image_id, caption)] of tfds coco_captions (prepared beforehand; never downloads)."""
  name, splits = tfds_data.parse_spec(spec)
  pairs = []
  for split in splits.split("+"):
    _, ds = tfds_data.open_split(name, split, data_dir)
    progress = console.Counter(f"captions of {name}[{split}]", len(ds))
    for i in range(len(ds)):
      example = ds[i]
      texts = example["captions"]["text"]
      pairs += [(int(example["image/id"]), _clean(t.decode("utf-8") if isinstance(t, bytes)
                                                  else str(t))) for t in texts]
      progress(i + 1)
  return pairs


def choose_captions(pairs, num: int, seed: int = 0) -> tuple:
  """(captions, image_ids): `num` distinct images, one caption each, deterministic in `seed`.

  Images are a seeded permutation of the sorted ids (independent of the file's order);
  each chosen image's caption is drawn with the same generator from its captions in
  file order. Empty captions are never chosen.
  """
  by_image = {}
  for image_id, caption in pairs:
    if caption:
      by_image.setdefault(int(image_id), []).append(caption)
  if not 0 < num <= len(by_image):
    raise ValueError(f"--num={num} prompts requested, but the captions cover {len(by_image)} "
                     "images (one caption per image); lower --num.")
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.asarray(sorted(by_image), np.int64))[:num]
  captions = [by_image[int(i)][int(rng.integers(len(by_image[int(i)])))] for i in ids]
  return captions, [int(i) for i in ids]


# ----------------------------------------------------------------------------
# Samples: images + prompts from tools.sample_t2i / tools.sample.


def _member(archive, key, path):
  """The checked zip member of npz key `key` (`key.npy`, or `key` as some writers name it):
  stored or deflate only, not encrypted (`io.limits.check_zip_member`)."""
  for name in (f"{key}.npy", key):
    if name in archive.NameToInfo:
      return limits.check_zip_member(archive.getinfo(name), f"{path}[{key}]")
  raise ValueError(f"{path} has no member {key!r}.")


def _text_array(path, key):
  """A 1-D string member (unicode, or UTF-8 bytes) of an npz as a list: inflated no further
  than its declared size, charged to a budget of the file's size, its header checked against
  that size before numpy reads it."""
  with zipfile.ZipFile(path) as archive:
    info = _member(archive, key, path)
    data = limits.read_zip_member(archive, info.filename,
                                  limits.Budget.for_size(os.path.getsize(path), str(path)))
  f = io.BytesIO(data)
  try:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f, max_header_size=10000)
  except (ValueError, SyntaxError, TypeError, EOFError) as e:
    raise ValueError(f"{path}: '{key}' is not a valid .npy member ({e}).") from None
  if dtype.kind not in "US" or len(shape) != 1:
    raise ValueError(f"{path}: '{key}' is {dtype} of shape {shape}; expected a 1-D array of "
                     "strings (np.asarray(list_of_prompts)).")
  if shape[0] * dtype.itemsize != len(data) - f.tell():
    raise ValueError(f"{path}: '{key}' claims {shape[0] * dtype.itemsize} bytes, the member "
                     f"holds {len(data) - f.tell()}: corrupt.")
  values = np.frombuffer(data, dtype, count=shape[0], offset=f.tell())
  return [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p)
          for p in values.tolist()]


def _mapped_images(path):
  """The `images` member memory-mapped when stored uncompressed (np.savez; 30k x 512^2 x 3
  bytes is 24 GB), else read whole; None when the member is not a plain uint8 array."""
  with zipfile.ZipFile(path) as archive:
    info = _member(archive, "images", path)
    if info.compress_type != zipfile.ZIP_STORED:
      return None
    with open(path, "rb") as f:
      f.seek(info.header_offset)
      local = f.read(30)
      if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: corrupt zip entry for 'images'.")
      start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
          local[28:30], "little")
      f.seek(start)
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      offset = f.tell()
  if dtype != np.uint8 or fortran or len(shape) != 4:
    return None
  if int(np.prod(shape)) > info.file_size - (offset - start):
    raise ValueError(f"{path}: 'images' claims shape {shape} but the file holds fewer bytes: "
                     "truncated or corrupt.")
  return np.memmap(path, np.uint8, "r", offset=offset, shape=tuple(shape))


def load_samples(path) -> tuple:
  """(images uint8 [N, H, W, 3], prompts [N]) of a samples npz, checked (module docstring).

  Images stored uncompressed (as `io.atomic.write_npz` writes them) are memory-mapped and
  read batch by batch by the metrics.
  """
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"--samples={path} does not exist.")
  keys = limits.npz_keys(path)
  missing = [k for k in ("images", "prompts", "prompt_index") if k not in keys]
  if missing:
    raise ValueError(f"{path} lacks {missing} (has {keys}); expected the npz of "
                     "tools.sample_t2i / tools.sample: images, prompts, prompt_index.")
  images = _mapped_images(path)
  arrays = limits.load_npz(path, keys=("prompt_index",) if images is not None
                           else ("images", "prompt_index"))
  images = arrays["images"] if images is None else images
  index = arrays["prompt_index"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{path}: images are {images.dtype} of shape {images.shape}; expected uint8 "
                     "NHWC RGB [N, H, W, 3].")
  prompts = _text_array(path, "prompts")
  if index.ndim != 1 or len(index) != len(images) or index.dtype.kind not in "iu":
    raise ValueError(f"{path}: prompt_index has shape {index.shape} ({index.dtype}) for "
                     f"{len(images)} images; expected one integer per image.")
  if len(index) and (index.min() < 0 or index.max() >= len(prompts)):
    raise ValueError(f"{path}: prompt_index lies in [{index.min()}, {index.max()}] but there "
                     f"are {len(prompts)} prompts.")
  return images, [prompts[int(i)] for i in index]
