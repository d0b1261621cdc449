"""Helpers shared by the test modules (no test module imports another one).

The toy config shrunk for tests, `main` run in this process or as a subprocess,
the saved state of a run's checkpoint, and the scalars of its event files.
"""

import os
import random
import signal
import subprocess
import sys
import time
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import toy2d
from fdistill_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `main` flags that shrink configs/toy2d.py to 2x32 MLPs and 16-example batches.
TOY_FLAGS = ["--config.batch_size=16", "--config.toy.width=32",
             "--config.toy.depth=2", "--config.toy.fit_steps=20", "--config.toy.fit_batch=64",
             "--config.sample_every=0",
             "--config.disc.resolutions=(0,1)", "--config.disc.channels=16",
             "--config.fake_score_update_freq=2", "--config.log_every=50"]


def small_toy(arg="js", **overrides):
  """The toy config shrunk for tests: 2x32 MLPs, 16-example batches."""
  c = toy2d.get_config(arg)
  c.toy.update(width=32, depth=2, fit_steps=20, fit_batch=64)
  c.disc.resolutions = (0, 1)
  c.disc.channels = 16
  c.batch_size, c.total_steps, c.fake_score_update_freq = 16, 3, 2
  c.log_every, c.checkpoint_every, c.sample_every = 1, 0, 0
  for k, v in overrides.items():
    config_lib.set_field(c, k, v)
  return c


def run_main_in_process(args):
  """`python -m fdistill_jax.main ARGS` in this process (its devices: 8 simulated)."""
  from fdistill_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  argv = ["main", *args]
  with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)        # config_flags reads --config.* overrides from sys.argv
    main_lib.main(["main"])


def env(devices=8):
  """The environment of a `main` subprocess: `devices` CPU devices, this session's cache."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return e


def run_main_subprocess(args, devices=1, timeout=900, cwd=REPO, **environ):
  """`python -m fdistill_jax.main ARGS` in a subprocess on `devices` CPU devices, run in
  `cwd` (whose fdistill_jax it imports), with the extra environment variables `environ`;
  its CompletedProcess (asserted to exit 0)."""
  out = subprocess.run([sys.executable, "-m", "fdistill_jax.main", *args], cwd=cwd,
                       env={**env(devices), **environ}, capture_output=True, text=True,
                       check=False, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def saved_state(workdir, step):
  """The raw saved TrainState at `step` (nested dicts of numpy arrays)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])   # whatever topology saved it
  return jax.device_get(ckptr.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)))


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def sigkill_after_first_checkpoint(cmd, workdir, max_delay, timeout=300):
  """Starts `cmd` (a run in `workdir`), SIGKILLs it a random 0..max_delay s after its first
  checkpoint appears; returns the steps saved at the kill (asserted non-empty)."""
  proc = subprocess.Popen(cmd, env=env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not saved_steps(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  time.sleep(random.Random().uniform(0.0, max_delay))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before the kill"
  at_kill = saved_steps(workdir)
  assert at_kill, "the run never wrote a checkpoint before it was killed"
  return at_kill


def read_scalars(workdir):
  """{tag: [(step, value), ...]} from the TensorBoard event files of a workdir."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    if all(v.size == 1 and v.dtype.kind == "f" for _, v in values):    # scalars only
      out[tag] = [(step, float(v)) for step, v in values]
  return out


def parse_main(argv):
  """(config, other flags) of `python -m fdistill_jax.main ARGV`, as main would see them."""
  from fdistill_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=["main", *argv])
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_bool("multihost", False, "", flag_values=fv)
  cwd = os.getcwd()
  try:
    os.chdir(REPO)             # config paths in the scripts are relative to the repository
    fv(["main", *argv])
  finally:
    os.chdir(cwd)
  for name in ("config", "workdir", "multihost"):
    assert name in main_lib.FLAGS, f"fdistill_jax.main has no --{name}"   # main's real flags
  return fv.config, {"workdir": fv.workdir, "multihost": fv.multihost}


def fake_digits_run(*args):
  """Stands in for `digits_sweep.run_one` in the sweep's worker processes (it is pickled by
  name): prints a line and returns (its run dir, one row with FD = seed, its process id)."""
  from fdistill_jax.tools import digits_sweep  # pylint: disable=g-import-not-at-top
  from fdistill_jax import console  # pylint: disable=g-import-not-at-top
  name, seed = args[2], args[4]
  print(f"training {name} seed {seed}", flush=True)
  console.say("a console line of %s seed %s", name, seed)
  return digits_sweep._plan(*args)[2], {"rows": [{"fd": float(seed)}]}, os.getpid()
