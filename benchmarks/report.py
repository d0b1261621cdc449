"""What every benchmark shares: timing a jitted function, the JSON report, the fixtures."""

import json
import os
import pathlib
import time

from fdistill_jax.io import atomic

REPO = pathlib.Path(__file__).resolve().parents[1]
# The shared fixtures (tests use the same variable); SD 1.5's config.json files and tokenizer,
# no weights, give the full-size architecture.
FIXTURES = pathlib.Path(os.environ.get("FDISTILL_SHARED_FIXTURES",
                                       REPO.parent / "shared" / "fixtures"))
SD15_CONFIGS = str(FIXTURES / "sd15")


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
  import jax  # pylint: disable=g-import-not-at-top  (benchmarks.memory sets XLA_FLAGS first)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(compiled(*args))
  return compile_s, (time.perf_counter() - start) / iters, compiled
