r"""XLA's buffer plan of the SD1.5 f-distill steps (no weights): `benchmarks.memory --xla_plan`.

  python -m benchmarks.sd15_memory --devices=8 --per_device_batch=1 --out=sd15_memory.json

Kept for the commands already recorded in benchmarks/results/; the one home of
this measurement is `benchmarks.memory` (`xla_plan`), which also prints the
backend-independent estimate a user can plan with (docs/performance.md). XLA's
plan is the backend's own: on a GPU that device's, on the CPU backend the CPU's
(no GPU fusion, and remat gives no saving there), so not a device estimate.
"""

import argparse
import json
import os
import pathlib
import sys
import time


def _parse(argv):
  from benchmarks.report import SD15_CONFIGS  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--per_device_batch", type=int, default=1)
  p.add_argument("--fsdp", type=int, default=0, help="0: all devices")
  p.add_argument("--variant", default="js")
  p.add_argument("--configs", default=SD15_CONFIGS)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", type=int, default=1)
  p.add_argument("--out", default="sd15_memory.json")
  return p.parse_args(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  if "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  config, name = memory.configure(f"{repo}/configs/sd15.py:{args.variant}", args.remat,
                                  args.dtype, None, args.devices, args.fsdp)
  start = time.time()
  plan = memory.xla_plan(config, args.devices, args.per_device_batch, args.configs, name)
  result = {"command": "python -m benchmarks.sd15_memory " + " ".join(argv),
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "devices": args.devices, "per_device_batch": args.per_device_batch,
            "global_batch": args.per_device_batch * args.devices, "fsdp": config.mesh.fsdp,
            "dtype": args.dtype, "remat": bool(args.remat), "variant": args.variant,
            "steps": plan, "seconds": time.time() - start}
  print(json.dumps(result, indent=1))
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
