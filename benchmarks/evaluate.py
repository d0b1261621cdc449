r"""Throughput (images/s) of the Inception feature pipeline, as JSON.

  python -m benchmarks.evaluate --batch_size=8 --iters=3 --out=/tmp/eval_bench.json
  python -m benchmarks.evaluate --inception=pt_inception-2015-12-05-6726825d.pth \
      --batch_size=500 --iters=20            # on a GPU / TPU host

Times `evaluate.extract_features` (uint8 NHWC -> resize to 299 -> Inception-v3
pool features, batch sharded over all of jax.devices()) after one warm-up
batch that compiles. Weights are random unless --inception is given (the
speed is the same). Also times `frechet_distance` at D=2048 with --fid.
"""

import argparse
import platform
import time

import jax
import numpy as np

from benchmarks.report import write_report
from fdistill_jax import evaluate, inception


def _time_features(feature_fn, size, batch_size, iters):
  images = np.random.default_rng(0).integers(0, 256, (batch_size * iters, size, size, 3), np.uint8)
  evaluate.extract_features(images[:batch_size], feature_fn, batch_size)  # Compile.
  start = time.perf_counter()
  evaluate.extract_features(images, feature_fn, batch_size)
  return len(images) / (time.perf_counter() - start)


def _time_fid(method):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2048, 4096)), rng.normal(size=(2048, 4096))
  s1, s2, mu = a @ a.T / 4096, b @ b.T / 4096, np.zeros(2048)
  start = time.perf_counter()
  evaluate.frechet_distance(mu, s1, mu, s2, method=method)
  return time.perf_counter() - start


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--inception", default=evaluate.RANDOM_INCEPTION)
  p.add_argument("--preprocessing", default="tf", choices=sorted(inception.PREPROCESSING))
  p.add_argument("--size", type=int, default=32, help="Input resolution before the resize.")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--fid", action="store_true", help="Also time frechet_distance at D=2048.")
  p.add_argument("--out", default=None)
  args = p.parse_args()

  feature_fn = evaluate.load_feature_fn(args.inception, args.preprocessing)
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
  main()
