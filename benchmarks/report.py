"""The one way every benchmark records its result: printed, and written as JSON."""

import json

from fdistill_jax.io import atomic


def write_report(report, out=None):
  """Prints `report` as JSON and, if `out` is given, writes it there atomically."""
  print(json.dumps(report, indent=2))
  if out:
    atomic.write_json(out, report)
