"""Runs hostile cases in one process under a memory limit; one JSON line per case.

  python tests/hostile_runner.py CASES.json OUT.jsonl MEMORY_GIB

Used by tests/hostile.py (not a test module). Each case is a dict:

  {"id": ..., "tool": "convert" | "sample" | "evaluate", "args": [...]}
      the command-line tool, in this process, exactly as `python -m` runs it
      (`cli.invoke`: user errors -> one line on stderr, exit code 1);
  {"id": ..., "tool": "main", "args": [...]}
      `fdistill_jax.main.main` after parsing the flags (SystemExit -> exit code);
  {"id": ..., "call": NAME, "kwargs": {...}}
      a function of `CALLS` below.

Each output line has the case id, the exit code ("rc"), stdout, stderr, the
traceback of any exception that escaped (None if none) and the seconds taken.
The address-space limit (`RLIMIT_AS`) makes an attempted huge allocation fail
at once instead of swapping the machine.
"""

import contextlib
import io
import json
import logging
import os
import resource
import sys
import time
import traceback


def _tool(name, args):
  from fdistill_jax.tools import cli  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"fdistill_jax.tools.{name}")
  return cli.invoke(module.main, name, module.FLAGS, args)


def _main(args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from fdistill_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  argv = ["main", *args]
  saved, sys.argv = sys.argv, argv           # config_flags reads --config.* overrides from sys.argv
  try:
    with flagsaver.flagsaver():              # forgets the --config.* flags each parse defines
      flags.FLAGS.unparse_flags()
      main_lib.main(flags.FLAGS(argv))
  except SystemExit as e:
    return int(e.code or 0)
  finally:
    sys.argv = saved
  return 0


def edm_batch(path, resolution, channels=3, num_classes=0, batch=4, skip=False):
  """Builds an EDM data source and reads batch 0 as a tool would ('data: error: ...')."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fdistill_jax.data import registry  # pylint: disable=g-import-not-at-top
  from fdistill_jax.tools import cli  # pylint: disable=g-import-not-at-top

  def read(argv):
    del argv
    source = registry.make_source(ml_collections.ConfigDict(dict(
        kind="edm", path=path, resolution=resolution, channels=channels,
        num_classes=num_classes, skip_unreadable=skip, num_threads=1)))
    images = source.batch(0, global_batch_size=batch)["images"]
    print(json.dumps({"values": sorted(set(images.reshape(-1).tolist()))[:8],
                      "min": float(images.min()), "max": float(images.max())}))
  return cli.call(read, "data", [])


def main_while_locked(workdir, args):
  """Runs main on `workdir` while this process holds the workdir's lock (a second run)."""
  from fdistill_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with checkpoint.lock_workdir(workdir):
    return _main(args)


def digest(directory):
  """Prints {relative path: sha256} of a directory's files (log.txt appends, run.lock names
  the last process that held the workdir: both excluded)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name not in ("log.txt", "run.lock"):
        file = os.path.join(root, name)
        with open(file, "rb") as f:
          out[os.path.relpath(file, directory)] = hashlib.sha256(f.read()).hexdigest()
  print(json.dumps(out, sort_keys=True))


def truncate_checkpoint(workdir, step):
  """Truncates every file of checkpoints/<step>/state to a third (a corrupt checkpoint)."""
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    for name in files:
      file = os.path.join(root, name)
      os.truncate(file, os.path.getsize(file) // 3)


def finite_checkpoints(workdir):
  """Prints {step: every array finite} for the saved training states of a workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = {}
  directory = os.path.join(workdir, "checkpoints")
  for step in sorted(int(s) for s in os.listdir(directory) if s.isdigit()):
    path = os.path.join(directory, str(step), "state")
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ckptr.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree))
    out[step] = all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state)
                    if np.issubdtype(np.asarray(x).dtype, np.inexact))
  print(json.dumps(out))


def allocate(gib):
  """Touches `gib` GiB of numpy memory: a MemoryError shows the address-space limit holds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  print(int(np.ones(int(gib * 2**30), np.uint8).sum()))


CALLS = {"allocate": allocate, "edm_batch": edm_batch, "main_while_locked": main_while_locked, "digest": digest,
         "truncate_checkpoint": truncate_checkpoint, "finite_checkpoints": finite_checkpoints}


def run_case(case):
  out, err = io.StringIO(), io.StringIO()
  start, tb, rc = time.time(), None, None
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      if "tool" in case and case["tool"] == "main":
        rc = _main(case["args"])
      elif "tool" in case:
        rc = _tool(case["tool"], case["args"])
      else:
        rc = CALLS[case["call"]](**case.get("kwargs", {})) or 0
    except BaseException:  # pylint: disable=broad-except  (recorded: the test fails on it)
      tb = traceback.format_exc()
  return {"id": case["id"], "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
          "traceback": tb, "seconds": time.time() - start}


class _CurrentStderr(logging.Handler):
  """Log records go to whatever sys.stderr is now (each case's captured stream)."""

  def emit(self, record):
    sys.stderr.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


def main():
  cases_file, out_file, gib = sys.argv[1], sys.argv[2], float(sys.argv[3])
  handler = _CurrentStderr()
  handler.setLevel(logging.WARNING)
  logging.getLogger().addHandler(handler)
  limit = int(gib * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  with open(cases_file) as f:
    cases = json.load(f)
  with open(out_file, "w") as out:
    for case in cases:
      out.write(json.dumps(run_case(case)) + "\n")
      out.flush()


if __name__ == "__main__":
  main()
