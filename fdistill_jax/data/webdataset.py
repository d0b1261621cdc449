"""Text sources: image-text WebDataset shards and captions-only prompt files.

`data.kind='webdataset'`: tar shards as img2dataset writes them (COYO-700M,
LAION): each example is `KEY.jpg` (or .jpeg / .png / .webp) plus `KEY.txt`
(its caption) in the same shard; other members (`KEY.json`, ...) are ignored.
`data.path` is a folder of `*.tar` shards (read in sorted order) or one `.tar`.
At construction the tar headers of every shard are indexed (about 28 bytes per
example in memory; no image is read), so example i can be read by offset and
the usual order applies: a fresh permutation per epoch from (data.seed,
epoch), global batch `step` at positions [step B, (step + 1) B), each process
reading only its own rows (`sources.example_indices`). A run resumed at step s
sees exactly the batches it would have seen.

Images are decoded with Pillow, converted to RGB, center-cropped to a square
and resized to data.resolution with bicubic filtering (img2dataset's
`resize_mode='center_crop'`), and scaled to [-1, 1]. An example whose image
cannot be decoded or is larger than `MAX_IMAGE_SIDE` on a side (read from its
header, before decoding), or whose caption is empty or not UTF-8, is skipped: its row
takes the next readable example of the index (i + 1, i + 2, ...), so the
batch stays a function of (seed, step); skips are counted in `source.skipped`
and logged.

`data.kind='captions'`: prompts only, for runs without the GAN's real branch
(`rkl,no_gan`): a text file with one prompt per line, or a JSONL file
(`.jsonl`) of objects with a `data.caption_key` field ('caption' by default).
Empty prompts are skipped and counted at load.

Batches: {'images': float32 [n, R, R, 3] in [-1, 1], 'captions': [n] str}
(webdataset) or {'captions': [n] str} (captions); the teacher's conditioning
tokenises the captions on the host (`train.conditioning`).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pathlib
import tarfile
import threading

import numpy as np
import PIL.Image

from fdistill_jax.data import pixels
from fdistill_jax.data import sources
from fdistill_jax.data.edm_dataset import MAX_IMAGE_BYTES
from fdistill_jax.io import limits

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_CAPTION_BYTES = 64 * 2**10
MAX_IMAGE_SIDE = 4096         # larger images are skipped from their header, never decoded
MAX_PROMPT_FILE_BYTES = 2**30
_LOG = logging.getLogger(__name__)


class _Skip(Exception):
  """An example that cannot be used (corrupt image, empty caption)."""


def shard_paths(path) -> list:
  """The `.tar` shards of `data.path` (a folder, searched non-recursively, or one file)."""
  p = pathlib.Path(path)
  if p.is_file() and p.suffix == ".tar":
    return [p]
  if p.is_dir():
    shards = sorted(q for q in p.iterdir() if q.suffix == ".tar" and q.is_file())
    if shards:
      return shards
    raise ValueError(f"data.path={path!r} holds no .tar shards; point it at a folder of "
                     "img2dataset WebDataset shards (00000.tar, 00001.tar, ...).")
  raise ValueError(f"data.path={path!r} is neither a folder of .tar shards nor a .tar file.")


def index_shard(path):
  """{key: {ext: (offset, size)}} of a shard's members (tar headers only)."""
  out = collections.defaultdict(dict)
  try:
    with tarfile.open(path, "r:") as tar:
      for m in tar:
        if m.isfile():
          stem, ext = os.path.splitext(m.name)
          out[stem][ext.lower()] = (m.offset_data, m.size)
  except (tarfile.TarError, OSError) as e:
    raise ValueError(f"{path}: not a readable tar shard ({e}); remove or rebuild it.") from None
  return out


class WebDatasetIndex:
  """Flat index of (shard, image offset/size, caption offset/size) over all shards."""

  def __init__(self, paths):
    self.paths = [str(p) for p in paths]
    rows, self.incomplete = [], 0
    for s, path in enumerate(self.paths):
      for key, parts in sorted(index_shard(path).items()):
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None or ".txt" not in parts:
          self.incomplete += 1
          continue
        rows.append((s, *image, *parts[".txt"]))
    if not rows:
      raise ValueError(f"No image + caption pairs (KEY.jpg + KEY.txt) in {len(self.paths)} "
                       f"shard(s) starting {self.paths[0]}.")
    self.rows = np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def read(self, i):
    """(image bytes, caption bytes) of example i."""
    s, img_off, img_size, txt_off, txt_size = (int(v) for v in self.rows[i])
    if img_size > MAX_IMAGE_BYTES or txt_size > MAX_CAPTION_BYTES:
      raise _Skip(f"member too large ({img_size} / {txt_size} bytes)")
    with open(self.paths[s], "rb") as f:
      f.seek(img_off)
      image = f.read(img_size)
      f.seek(txt_off)
      caption = f.read(txt_size)
    return image, caption


def center_crop_resize(data: bytes, resolution: int) -> np.ndarray:
  """uint8 [R, R, 3]: decode, RGB, center square crop, bicubic resize (module docstring)."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:   # reads the header only
      if max(im.size) > MAX_IMAGE_SIDE:
        raise _Skip(f"image too large ({im.size[0]}x{im.size[1]} pixels, at most "
                    f"{MAX_IMAGE_SIDE} per side; checked before decoding)")
      im = im.convert("RGB")
      w, h = im.size
      s = min(w, h)
      left, top = (w - s) // 2, (h - s) // 2
      im = im.crop((left, top, left + s, top + s))
      return np.asarray(im.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC))
  except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as e:
    raise _Skip(f"cannot decode the image ({str(e)[:100]})") from None


def decode_caption(data: bytes) -> str:
  try:
    text = data.decode("utf-8").strip()
  except UnicodeDecodeError:
    raise _Skip("caption is not UTF-8") from None
  if not text:
    raise _Skip("empty caption")
  return text


class _SkipCounter:
  """Thread-safe counts of skipped examples, by reason."""

  def __init__(self):
    self.counts, self._lock = collections.Counter(), threading.Lock()

  def add(self, reason, where):
    with self._lock:
      self.counts[reason.split(" (")[0]] += 1
    _LOG.warning("%s: skipped (%s).", where, reason)


class TextSource(sources.IndexedSource):
  """An `IndexedSource` whose batches carry captions instead of one-hot labels."""
  has_captions = True

  def batch(self, step: int, *, global_batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    idx = sources.example_indices(
        self.seed, step, global_batch_size=global_batch_size, num_examples=self.num_examples,
        process_index=process_index, process_count=process_count)
    images, captions = self._read(idx)
    out = {"captions": [str(c) for c in captions]}
    if self.image_shape is not None:
      out["images"] = pixels.to_unit_range(np.asarray(images))
    return out


def webdataset_source(config) -> TextSource:
  """`data.kind='webdataset'` (module docstring)."""
  res = int(sources.field(config, "resolution"))
  index = WebDatasetIndex(shard_paths(sources.field(config, "path")))
  skipped = _SkipCounter()
  if index.incomplete:
    skipped.counts["missing image or caption"] += index.incomplete

  def read_one(i):
    for k in range(min(len(index), 1000)):
      j = (i + k) % len(index)
      try:
        image, caption = index.read(j)
        text = decode_caption(caption)
        return center_crop_resize(image, res), text
      except _Skip as e:
        skipped.add(str(e), f"example {j} of {index.paths[int(index.rows[j, 0])]}")
    raise ValueError(f"1000 consecutive examples from {i} are unreadable; check the shards.")

  read = sources.batch_reader(read_one, len(index), config)
  source = TextSource(read, num_examples=len(index), image_shape=(res, res, 3), num_classes=0,
                      seed=int(config.get("seed", 0)), name="webdataset source")
  source.skipped = skipped.counts
  return source


def read_prompts(path, caption_key="caption", what="data.path") -> tuple[list, int]:
  """(non-empty prompts, number of empty ones skipped) of a .txt or .jsonl file.

  The one prompts-file reader (training captions, evaluation prompts, grids,
  the sampling tools); `what` names the setting the path came from in errors.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{what}={str(path)!r} is not a file; expected a .txt (one prompt "
                            "per line) or .jsonl prompts file.")
  if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
    raise ValueError(f"{path}: {p.stat().st_size} bytes is over the 1 GiB limit for a prompts "
                     "file; split it.")
  try:
    lines = p.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the "
                     "prompts file as UTF-8.") from None
  if p.suffix == ".jsonl":
    prompts = []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:      # bounded: a line nested 100,000 deep is one line of error, not a traceback
        record = limits.json_loads(line, f"{path}:{n}", max_depth=8)
      except ValueError as e:
        raise ValueError(f"{e} Expected one JSON object per line.") from None
      if not isinstance(record, dict) or not isinstance(record.get(caption_key), str):
        raise ValueError(f"{path}:{n}: expected an object with a string {caption_key!r} field "
                         "(set data.caption_key).")
      prompts.append(record[caption_key])
  else:
    prompts = lines
  kept = [t.strip() for t in prompts if t.strip()]
  if not kept:
    raise ValueError(f"{path} holds no non-empty prompt.")
  return kept, len(prompts) - len(kept)


def captions_source(config) -> TextSource:
  """`data.kind='captions'` (module docstring): prompts only, no images."""
  prompts, empty = read_prompts(sources.field(config, "path"),
                                config.get("caption_key", "caption"))
  prompts = np.asarray(prompts, dtype=object)
  source = TextSource(lambda idx: (None, prompts[idx]), num_examples=len(prompts),
                      image_shape=(1, 1, 1), num_classes=0, seed=int(config.get("seed", 0)),
                      name="captions source")
  source.image_shape = None          # no real images: no GAN branch
  source.skipped = collections.Counter({"empty caption": empty} if empty else {})
  return source
