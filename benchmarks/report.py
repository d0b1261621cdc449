"""What every benchmark shares: timing a jitted function, and the JSON report."""

import json
import time

import jax

from fdistill_jax.io import atomic


def write_report(report, out=None):
  """Prints `report` as JSON and, if `out` is given, writes it there atomically."""
  print(json.dumps(report, indent=2))
  if out:
    atomic.write_json(out, report)


def time_jit(fn, args, warmup, iters):
  """(compile seconds, mean seconds per call, compiled) of jax.jit(fn) on `args`.

  Compilation (lower + compile) is timed apart; then `warmup` untimed calls,
  then `iters` calls each waited for with block_until_ready.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(compiled(*args))
  return compile_s, (time.perf_counter() - start) / iters, compiled
