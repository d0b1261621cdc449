r"""Throughput (images/s) of the Inception feature pipeline, as JSON.

  python -m benchmarks.evaluate --batch_size=8 --iters=3 --out=/tmp/eval_bench.json
  python -m benchmarks.evaluate --inception=pt_inception-2015-12-05-6726825d.pth \
      --batch_size=500 --iters=20            # on a GPU / TPU host

Times `fid.extract_features` (uint8 NHWC -> resize to 299 -> Inception-v3
pool features, batch sharded over all of jax.devices()) after one warm-up
batch that compiles. Weights are random unless --inception is given (the
speed is the same). Also times `frechet_distance` at D=2048 with --fid.
"""

import platform
import time

import jax
import numpy as np

from benchmarks.report import write_report
from absl import flags

from fdistill_jax.metrics import fid
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.models import inception
from fdistill_jax.tools import cli


def _time_features(feature_fn, size, batch_size, iters):
  images = np.random.default_rng(0).integers(0, 256, (batch_size * iters, size, size, 3), np.uint8)
  fid.extract_features(images[:batch_size], feature_fn, batch_size)  # Compile.
  start = time.perf_counter()
  fid.extract_features(images, feature_fn, batch_size)
  return len(images) / (time.perf_counter() - start)


def _time_fid(method):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2048, 4096)), rng.normal(size=(2048, 4096))
  s1, s2, mu = a @ a.T / 4096, b @ b.T / 4096, np.zeros(2048)
  start = time.perf_counter()
  metrics.frechet_distance(mu, s1, mu, s2, method=method)
  return time.perf_counter() - start


FLAGS = cli.new_flags()
flags.DEFINE_string("inception", fid.RANDOM_INCEPTION, "Inception weights (speed does not "
                    "depend on them).", flag_values=FLAGS)
flags.DEFINE_enum("preprocessing", "tf", sorted(inception.PREPROCESSING), "Preprocessing.",
                  flag_values=FLAGS)
flags.DEFINE_integer("size", 32, "Input resolution before the resize.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per batch.", flag_values=FLAGS)
flags.DEFINE_integer("iters", 5, "Timed batches.", flag_values=FLAGS)
flags.DEFINE_bool("fid", False, "Also time frechet_distance at D=2048.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output file.", flag_values=FLAGS)


def main(argv):
  del argv
  args = FLAGS

  feature_fn = fid.load_feature_fn(args.inception, args.preprocessing)
  result = {
      "images_per_s": _time_features(feature_fn, args.size, args.batch_size, args.iters),
      "batch_size": args.batch_size, "iters": args.iters, "input_size": args.size,
      "preprocessing": args.preprocessing, "devices": [str(d) for d in jax.devices()],
      "backend": jax.default_backend(), "host": platform.node(), "jax": jax.__version__,
  }
  if args.fid:
    result.update({f"fid_{m}_s": _time_fid(m) for m in ("eigh", "sqrtm")})
  write_report(result, args.out)


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.evaluate", FLAGS, __doc__)()
