"""Throughput of the full-size EDM teachers (forward, forward+backward), as JSON.

  python -m benchmarks.teacher --arch cifar10 --batch 4 --iters 2 --out /tmp/teacher.json
  python -m benchmarks.teacher --batch 256 --out teacher_gpu.json   # all archs x dtypes

For each (arch, dtype) it times, on jax.devices()[0]:
  forward:           D(x; sigma, y) of EDMPrecond (eval mode, no dropout);
  forward_backward:  value and gradient w.r.t. all parameters of
                     mean((D(x; sigma, y) - x)^2), the shape of a fake-score step.
Compile time (lower + compile) is reported separately from the steady state:
after `--warmup` calls, `--iters` calls are timed with block_until_ready.
Weights are random (speed does not depend on them); parameters are float32,
`--dtype` is the compute dtype.
"""

import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import time_jit, write_report
from absl import flags

from fdistill_jax.models.edm import ARCHS
from fdistill_jax.models.edm import build_edm
from fdistill_jax.loaders.edm_variables import count_params
from fdistill_jax.loaders.edm_variables import random_variables
from fdistill_jax.tools import cli
from fdistill_jax.train.teacher import DTYPES

DEFAULT_BATCH = {"cifar10": 128, "imagenet64": 64}


def _inputs(arch, batch, seed=0):
  rng = np.random.default_rng(seed)
  r, c = arch["img_resolution"], arch["img_channels"]
  x = jnp.asarray(rng.standard_normal((batch, r, r, c), np.float32))
  sigma = jnp.asarray(np.exp(rng.normal(-1.2, 1.2, batch)).astype(np.float32))
  labels = jax.nn.one_hot(rng.integers(0, arch["label_dim"], batch), arch["label_dim"])
  return x, sigma, labels


def benchmark(arch_name, dtype_name, batch, warmup, iters):
  arch = ARCHS[arch_name]
  net = build_edm(arch, dtype=DTYPES[dtype_name])
  variables = random_variables(net)
  x, sigma, labels = _inputs(arch, batch)

  def forward(v, x, sigma, labels):
    return net.apply(v, x, sigma, labels)

  def loss(params, x, sigma, labels):
    return jnp.mean(jnp.square(net.apply({"params": params}, x, sigma, labels) - x))

  result = {"arch": arch_name, "dtype": dtype_name, "batch": batch,
            "params": count_params(net)}
  for name, fn, first in (("forward", forward, variables),
                          ("forward_backward", jax.value_and_grad(loss), variables["params"])):
    compile_s, step_s, _ = time_jit(fn, (first, x, sigma, labels), warmup, iters)
    result[name] = {"images_per_s": batch / step_s, "step_ms": 1e3 * step_s,
                    "compile_s": compile_s}
    print(json.dumps({arch_name: dtype_name, name: result[name]}), flush=True)
  return result


FLAGS = cli.new_flags()
flags.DEFINE_multi_enum("arch", [], sorted(DEFAULT_BATCH), "Repeatable; default: both.",
                        flag_values=FLAGS)
flags.DEFINE_multi_enum("dtype", [], sorted(DTYPES), "Compute dtype, repeatable; default: "
                        "both.", flag_values=FLAGS)
flags.DEFINE_integer("batch", None, f"Batch size; default {DEFAULT_BATCH}.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed calls (after compilation).", flag_values=FLAGS)
flags.DEFINE_integer("iters", 10, "Timed calls.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output file.", flag_values=FLAGS)


def main(argv):
  del argv
  args = FLAGS

  device = jax.devices()[0]
  report = {"device_kind": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "host": platform.node(), "warmup": args.warmup, "iters": args.iters,
            "results": []}
  for arch_name in args.arch or sorted(DEFAULT_BATCH):
    for dtype_name in args.dtype or sorted(DTYPES, reverse=True):
      batch = args.batch or DEFAULT_BATCH[arch_name]
      report["results"].append(benchmark(arch_name, dtype_name, batch, args.warmup, args.iters))
  write_report(report, args.out)


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.teacher", FLAGS, __doc__)()
