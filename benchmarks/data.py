"""Input throughput (images/s) of the data sources, as JSON.

  python -m benchmarks.data --out=/tmp/data_bench.json

Measures `source.batch` for a few steps after one warm-up step, single
process, on:
  tfds_mock_cifar10: cifar10 under tfds.testing.mock_data (random examples
    generated per index; exercises the tfds path, not ArrayRecord reads);
  edm_folder_32 / edm_zip_32: an EDM-format dataset of 32x32 RGB PNGs written
    uncompressed as dataset_tool.py does;
  edm_zip_32_cache_fill / edm_zip_32_cached: `cache=True`, decoding the whole
    dataset at construction, then serving batches from memory;
  memory_32: in-memory uint8 arrays (the cost of ordering and scaling alone).
"""

import io
import json
import os
import platform
import tempfile
import time
import zipfile

import numpy as np
import PIL.Image

from benchmarks.report import write_report
from absl import flags

from fdistill_jax.data import registry
from fdistill_jax.tools import cli


def _write_edm(root, n, res, as_zip):
  rng = np.random.default_rng(0)
  files = {}
  for i in range(n):
    buf = io.BytesIO()
    img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    PIL.Image.fromarray(img).save(buf, format="png", compress_level=0)
    files[f"{i // 1000:05d}/img{i:08d}.png"] = buf.getvalue()
  labels = [[name, i % 10] for i, name in enumerate(files)]
  files["dataset.json"] = json.dumps({"labels": labels}).encode()
  path = os.path.join(root, "ds.zip" if as_zip else "ds")
  if as_zip:
    with zipfile.ZipFile(path, "w") as z:
      for name, blob in files.items():
        z.writestr(name, blob)
    return path
  for name, blob in files.items():
    os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
      f.write(blob)
  return path


def _throughput(source, batch_size, steps):
  source.batch(0, global_batch_size=batch_size)  # Warm-up: threads, caches.
  start = time.perf_counter()
  for step in range(1, steps + 1):
    source.batch(step, global_batch_size=batch_size)
  return batch_size * steps / (time.perf_counter() - start)


FLAGS = cli.new_flags()
flags.DEFINE_string("out", None, "JSON output file.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "Global batch.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 8, "Timed batches.", flag_values=FLAGS)
flags.DEFINE_integer("num_threads", 8, "Reader threads.", flag_values=FLAGS)
flags.DEFINE_integer("num_examples", 4096, "Examples in each synthetic dataset.",
                     flag_values=FLAGS)


def main(argv):
  del argv
  args = FLAGS
  base = dict(resolution=32, num_classes=10, num_threads=args.num_threads)
  results = {}

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=args.num_examples):
    src = registry.make_source(dict(kind="tfds", name="cifar10", **base))
    results["tfds_mock_cifar10"] = _throughput(src, args.batch_size,
                                               args.steps)
  with tempfile.TemporaryDirectory() as tmp:
    for as_zip in (False, True):
      path = _write_edm(tmp, args.num_examples, 32, as_zip)
      src = registry.make_source(dict(kind="edm", path=path, **base))
      results["edm_zip_32" if as_zip else "edm_folder_32"] = _throughput(
          src, args.batch_size, args.steps)
    start = time.perf_counter()
    src = registry.make_source(dict(kind="edm", path=path, cache=True, **base))
    results["edm_zip_32_cache_fill"] = args.num_examples / (
        time.perf_counter() - start)
    results["edm_zip_32_cached"] = _throughput(src, args.batch_size,
                                               args.steps)
  images = np.zeros((args.num_examples, 32, 32, 3), np.uint8)
  src = registry.make_source(dict(kind="memory", images=images,
                              labels=np.arange(args.num_examples) % 10, **base))
  results["memory_32"] = _throughput(src, args.batch_size, args.steps)

  report = dict(images_per_s={k: round(v, 1) for k, v in results.items()},
                batch_size=args.batch_size, steps=args.steps,
                num_threads=args.num_threads, cpu_count=os.cpu_count(),
                machine=platform.machine(), python=platform.python_version())
  write_report(report, args.out)


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.data", FLAGS, __doc__)()
