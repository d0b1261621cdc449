"""Data sources: deterministic, process-sharded training batches.

A source turns (seed, step) into a global batch of images in [-1, 1] (EDM's
scaling, x / 127.5 - 1) and one-hot class labels, and hands each process only
its own rows, so a run resumed at step s sees exactly the batches it would have
seen. The example order is a fresh permutation of the dataset per epoch, drawn
from (seed, epoch); global batch `step` takes positions
[step * B, (step + 1) * B) of the concatenated epochs (`example_indices`).

Sources are built from `config.data` by the run's registry, which dispatches on
`kind`: the generic kinds of `fdistill_jax.data.registry.SOURCES` ('tfds', 'edm',
'memory', and the text sources 'webdataset' and 'captions' of `data.webdataset`,
whose batches carry captions instead of labels) and the problems' own ('toy',
'digits'). This module holds what every source shares: the example order, the
checks, `IndexedSource`, the in-memory source and `Prefetcher`.

Config fields (`config.data`):
  kind: str, required. 'tfds', 'edm', 'memory', 'webdataset', 'captions', or a
    problem's kind ('toy', 'digits').
  resolution: int, required. Image height and width; data of another size is
    refused.
  channels: int, default 3. Image channels; data with others is refused.
  num_classes: int, required. Number of classes; 0 = unconditional (labels are
    then float32 [B, 0] and the dataset's labels are ignored). Labels outside
    [0, num_classes) are refused.
  seed: int >= 0, default 0. Seed of the example order.
  num_threads: int, default 8. Threads that read and decode examples.
  cache: bool, default False ('tfds', 'edm'). Decode the whole dataset into
    memory once at construction (small datasets such as CIFAR-10).
  name: str ('tfds'). TFDS name, e.g. 'cifar10' or 'imagenet_resized/64x64'.
  split: str ('tfds'), default 'train'. TFDS split, e.g. 'train[:90%]'.
  data_dir: str or None ('tfds'), default None; None or "" = TFDS's default
    directory (~/tensorflow_datasets or $TFDS_DATA_DIR).
    The dataset must be prepared there in the array_record format.
  image_key, label_key: str ('tfds'), defaults 'image', 'label'.
  path: str ('edm'). Output of EDM's dataset_tool.py: a zip file or a folder
    of images (searched recursively) with an optional dataset.json holding
    {"labels": [[relative file name, integer class], ...]} or {"labels": null}.
  images: array ('memory'). [N, H, W, C] uint8, or float in [-1, 1].
  labels: array or None ('memory'). [N] integer classes.

Example:
  source = make_source(ml_collections.ConfigDict(dict(
      kind='tfds', name='cifar10', resolution=32, num_classes=10, seed=0)))
  with Prefetcher(source, start_step, global_batch_size=512,
                  process_index=jax.process_index(),
                  process_count=jax.process_count()) as batches:
    for batch in batches: ...
"""


from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from fdistill_jax.data import pixels

_REQUIRED = object()


class Source(Protocol):
  """What the training loop consumes (see the module docstring)."""
  num_classes: int
  image_shape: tuple[int, int, int]

  def batch(self, step: int, *, global_batch_size: int,
            process_index: int = 0, process_count: int = 1) -> dict:
    ...


# ----------------------------------------------------------------------------
# Example order.


def local_batch_size(global_batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> int:
  """Rows of the global batch that one process holds, after checking them."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"Global batch size {global_batch_size} is not a positive multiple of "
        f"the process count {process_count}: every process must hold the same "
        "number of rows. Choose a batch size divisible by the process count.")
  return global_batch_size // process_count


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch, a function of (seed, epoch) only."""
  bits = np.random.PCG64(np.random.SeedSequence([seed, epoch]))
  perm = np.random.Generator(bits).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def example_indices(seed: int, step: int, *, global_batch_size: int,
                    num_examples: int, process_index: int = 0,
                    process_count: int = 1) -> np.ndarray:
  """Dataset indices of this process's rows of global batch `step`.

  Row i of the global batch is position step * B + i of the stream formed by
  concatenating per-epoch permutations; process p holds rows [p*n, (p+1)*n).

  Returns:
    int64 [global_batch_size // process_count].
  """
  n = local_batch_size(global_batch_size, process_index, process_count)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  pos = step * global_batch_size + process_index * n + np.arange(n)
  epochs, within = np.divmod(pos, num_examples)
  out = np.empty(n, np.int64)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = _permutation(seed, int(epoch), num_examples)[within[rows]]
  return out


# ----------------------------------------------------------------------------
# Checks shared by all sources.


def check_image(image: np.ndarray, image_shape: tuple[int, int, int],
                 where: str) -> np.ndarray:
  """Adds a channel axis to grayscale images, refuses other shapes."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape != tuple(image_shape):
    raise ValueError(
        f"{where}: image has shape {image.shape} (H, W, C) but the config "
        f"expects {tuple(image_shape)} (data.resolution={image_shape[0]}, "
        f"data.channels={image_shape[2]}). Resize/convert the dataset or fix "
        "the config.")
  return image


def check_labels(labels: np.ndarray, num_classes: int, where: str):
  """Refuses labels that are not integers in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integer classes, got dtype "
                     f"{labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{where}: labels span [{labels.min()}, {labels.max()}] but must lie "
        f"in [0, {num_classes}) for data.num_classes={num_classes}. Set "
        "num_classes to the dataset's class count (0 = unconditional).")


def one_hot(labels, num_classes: int, n: int) -> np.ndarray:
  if num_classes == 0:
    return np.zeros((n, 0), np.float32)
  return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


# ----------------------------------------------------------------------------
# The source.


class IndexedSource:
  """A finite dataset read by index in the order of `example_indices`.

  Attributes:
    num_classes: classes of the one-hot labels (0 = unconditional).
    image_shape: (H, W, C).
    num_examples: dataset size N.
  """

  def __init__(self, read: Callable[[np.ndarray], tuple[np.ndarray, Any]], *,
               num_examples: int, image_shape: Sequence[int],
               num_classes: int, seed: int, name: str):
    """`read(indices)` returns (images [n, H, W, C], integer labels [n])."""
    if num_examples < 1:
      raise ValueError(f"{name}: the dataset is empty.")
    if seed < 0:
      raise ValueError(f"{name}: data.seed must be >= 0, got {seed}.")
    self._read = read
    self.num_examples = int(num_examples)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    self.name = name

  def batch(self, step: int, *, global_batch_size: int,
            process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of global batch `step` (see the module docstring).

    Returns:
      {'images': float32 [n, H, W, C] in [-1, 1],
       'labels': float32 one-hot [n, num_classes]}, n = B / process_count.
    """
    idx = example_indices(
        self.seed, step, global_batch_size=global_batch_size,
        num_examples=self.num_examples, process_index=process_index,
        process_count=process_count)
    images, labels = self._read(idx)
    if self.num_classes:
      check_labels(labels, self.num_classes, f"{self.name} step {step}")
    return {"images": pixels.to_unit_range(np.asarray(images)),
            "labels": one_hot(labels, self.num_classes, len(idx))}


def batch_reader(read_one: Callable[[int], tuple[np.ndarray, int]],
                  num_examples: int, config):
  """Batch reader from a per-example reader, run in chunks on a thread pool.

  Reads example 0 at once, so that undecodable or odd-sized data fails at
  construction. With `data.cache`, decodes the whole dataset once into memory
  (as EDM's `cache=True`; CIFAR-10 takes 150 MB).
  """
  num_threads = int(field(config, "num_threads", 8))
  pool = concurrent.futures.ThreadPoolExecutor(
      num_threads, thread_name_prefix="fdistill-data")

  def read_chunk(chunk):
    return [read_one(int(i)) for i in chunk]

  def read(indices):
    chunks = np.array_split(indices, min(len(indices), num_threads))
    pairs = [p for part in pool.map(read_chunk, chunks) for p in part]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])

  read(np.zeros(1, np.int64))
  if not field(config, "cache", False):
    return read
  images, labels = read(np.arange(num_examples))
  pool.shutdown()
  return lambda indices: (images[indices], labels[indices])


def field(config, key: str, default=_REQUIRED):
  value = config.get(key, default)
  if value is _REQUIRED:
    raise ValueError(f"config.data.{key} is required for data.kind="
                     f"{config.get('kind')!r} (see fdistill_jax/data/sources.py).")
  return value


def common_fields(config) -> dict:
  """The fields shared by every source, checked."""
  res = int(field(config, "resolution"))
  ch = int(field(config, "channels", 3))
  num_classes = int(field(config, "num_classes"))
  if res < 1 or ch < 1 or num_classes < 0:
    raise ValueError(f"Bad data config: resolution={res}, channels={ch}, "
                     f"num_classes={num_classes}; need positive sizes and "
                     "num_classes >= 0.")
  return dict(image_shape=(res, res, ch), num_classes=num_classes,
              seed=int(field(config, "seed", 0)))


# ----------------------------------------------------------------------------
# In-memory arrays (tests, small runs).


def memory_source(config) -> IndexedSource:
  """Source over arrays: images uint8 or float in [-1, 1], integer labels."""
  common = common_fields(config)
  images = np.asarray(field(config, "images"))
  labels = field(config, "labels", None)
  where = "memory source"
  if images.ndim != 4 or images.shape[1:] != common["image_shape"]:
    raise ValueError(
        f"{where}: images have shape {images.shape} but must be [N, H, W, C] "
        f"= [N, {', '.join(map(str, common['image_shape']))}] (data.resolution"
        ", data.channels).")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"{where}: images must be uint8 or float in [-1, 1], "
                       f"got dtype {images.dtype}.")
    if images.size and (images.min() < -1 or images.max() > 1):
      raise ValueError(f"{where}: float images must lie in [-1, 1], got "
                       f"[{images.min()}, {images.max()}]. Scale them first.")
  if common["num_classes"]:
    if labels is None or np.shape(labels) != (len(images),):
      raise ValueError(f"{where}: data.num_classes={common['num_classes']} "
                       f"needs labels of shape [{len(images)}], got "
                       f"{None if labels is None else np.shape(labels)}.")
    check_labels(labels, common["num_classes"], where)
    labels = np.asarray(labels, np.int64)
  else:
    labels = np.zeros(len(images), np.int64)

  def read(indices):
    return images[indices], labels[indices]
  return IndexedSource(read, num_examples=len(images), name=where, **common)


# ----------------------------------------------------------------------------
# Background prefetching.


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


class Prefetcher:
  """Yields `source.batch(step, ...)` for steps start, start + 1, ...

  A background thread computes up to `buffer_size` batches ahead, so the
  accelerator does not wait on reading and decoding. `transform`, if given,
  runs in that thread too (e.g. `jax.make_array_from_process_local_data`).
  An exception in the thread is re-raised by the consumer's `next`. Use as a
  context manager, or call `close()`, to stop the thread.
  """

  def __init__(self, source: Source, start_step: int, *,
               global_batch_size: int, process_index: int = 0,
               process_count: int = 1, num_steps: int | None = None,
               buffer_size: int = 2, transform: Callable | None = None):
    local_batch_size(global_batch_size, process_index, process_count)
    self._source, self._kwargs = source, dict(
        global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count)
    self._start, self._num_steps = start_step, num_steps
    self._transform = transform or (lambda b: b)
    self._queue = queue.Queue(maxsize=max(1, buffer_size))
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, daemon=True,
                                    name="fdistill-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def _work(self):
    step = self._start
    try:
      while self._num_steps is None or step < self._start + self._num_steps:
        batch = self._transform(self._source.batch(step, **self._kwargs))
        if not self._put(batch):
          return
        step += 1
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e))

  def _get(self):
    """Next queued item; never waits on a worker that has already exited."""
    while True:
      try:
        return self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          return _Failure(RuntimeError(
              "The prefetch worker exited without a batch or an error."))

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  next = __next__

  def close(self):
    """Stops the worker thread and drops buffered batches."""
    self._done = True
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
