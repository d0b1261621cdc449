"""The one way every benchmark records its result: printed, and written as JSON."""

import json
import os


def write_report(report, out=None):
  """Prints `report` as JSON and, if `out` is given, writes it there atomically."""
  text = json.dumps(report, indent=2)
  print(text)
  if out:
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, out)
