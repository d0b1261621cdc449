"""Durable runs: exact resume after SIGKILL, SIGTERM, corrupt checkpoints,
incompatible configs, non-finite losses, and two processes = one process.

Runs use the toy config shrunk to 2x32 MLPs (see tests/helpers.small_toy), so a
step takes milliseconds and compilation dominates.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from fdistill_jax import plugins
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop as train
from tests.helpers import (REPO, TOY_FLAGS, assert_trees_equal, env, saved_state,
                           saved_steps, sigkill_after_first_checkpoint, small_toy)

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


def toy_overrides(total_steps, checkpoint_every):
  return {"total_steps": total_steps, "checkpoint_every": checkpoint_every, "log_every": 50}


def main_cmd(workdir, total_steps, checkpoint_every, *extra):
  return ([sys.executable, "-m", "fdistill_jax.main", f"--config={REPO}/configs/toy2d.py:js",
           f"--workdir={workdir}", f"--config.total_steps={total_steps}",
           f"--config.checkpoint_every={checkpoint_every}"] + TOY_FLAGS + list(extra))


def run_in_process(workdir, **overrides):
  return train.train_and_evaluate(small_toy("js", **overrides), str(workdir), registry=REGISTRY)


@pytest.mark.slow      # a subprocess killed and resumed
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path):
  """Killed with SIGKILL mid-run and resumed, a run reaches bitwise the same state
  at step T as a run never interrupted (CPU, same device count)."""
  total, every = 120, 10
  reference = tmp_path / "reference"
  run_in_process(reference, **toy_overrides(total, every))

  killed = tmp_path / "killed"
  sigkill_after_first_checkpoint(main_cmd(killed, total, every), killed, max_delay=0.3)
  run_in_process(killed, **toy_overrides(total, every))      # resumes automatically
  assert saved_steps(killed)[-1] == total
  assert_trees_equal(saved_state(reference, total), saved_state(killed, total))


def wait_for_steps(workdir, proc, timeout=300):
  """Waits until the run is past its first checkpoint-free steps (log.txt shows progress)."""
  deadline = time.time() + timeout
  log = os.path.join(workdir, "log.txt")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(log) and "First iteration done" in open(log).read():
      return
    time.sleep(0.1)
  raise AssertionError("the run did not start iterating in time")


@pytest.mark.slow      # a toy run in a subprocess, signalled
def test_sigterm_saves_at_once_and_exits_as_preempted(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(main_cmd(workdir, 100000, 1000), env=env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_steps(workdir, proc)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, err[-2000:]
  steps = saved_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert "SIGTERM" in open(workdir / "log.txt").read()
  assert "Preempted at step" in out and "Traceback" not in err
  status = json.loads((workdir / "status.json").read_text())
  assert status == {"state": "preempted", "step": steps[0]}
  assert not (workdir / "metrics.json").exists()      # the final report is not written


@pytest.mark.slow      # a toy run through main, then a resume
def test_corrupt_latest_checkpoint_is_skipped(tmp_path, caplog):
  run_in_process(tmp_path, **toy_overrides(4, 2))
  assert saved_steps(tmp_path) == [2, 4]
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
  config = ml_collections.FrozenConfigDict(small_toy("js", **toy_overrides(4, 2)))
  trainer = train.Trainer(config, registry=REGISTRY)
  mngr = ckpt_lib.manager(str(tmp_path), config)
  restored = ckpt_lib.restore_latest(mngr, ckpt_lib.abstract(trainer.state), config)
  warned = [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
  assert not warned, "orbax's metadata warning on resume"
  assert int(restored.step) == 2
  assert_trees_equal(jax.device_get(restored.gen), saved_state(tmp_path, 2)["gen"])
  assert any("Skipping unreadable checkpoint at step 4" in r.message for r in caplog.records)


def test_incompatible_config_is_refused(tmp_path, monkeypatch):
  """... before the teacher loads (for SD that takes minutes)."""
  run_in_process(tmp_path, **toy_overrides(2, 2))
  def no_teacher(config, *unused):
    raise AssertionError(f"the teacher {config.teacher.kind} was loaded before the refusal")
  monkeypatch.setattr(train.runner, "load_teacher", no_teacher)
  with pytest.raises(ValueError, match="divergence: checkpoint has 'js', config has 'fkl'"):
    train.train_and_evaluate(small_toy("fkl", **toy_overrides(4, 2)), str(tmp_path),
                             registry=REGISTRY)
  with pytest.raises(ValueError, match="incompatible config"):
    train.train_and_evaluate(small_toy("js", **toy_overrides(4, 2), **{"disc.channels": 8}),
                             str(tmp_path), registry=REGISTRY)


@pytest.mark.slow      # two runs
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  run_in_process(tmp_path, **toy_overrides(2, 2))
  good = saved_state(tmp_path, 2)
  # Resumed from step 2, so the failure is at a later step (not a fresh start).
  with pytest.raises(FloatingPointError,
                     match=r"Non-finite values at step (?![12]\b)\d+ in: .*(loss|norm)"):
    run_in_process(tmp_path, **toy_overrides(40, 20), **{"optim.gen_lr": 1e38})
  assert saved_steps(tmp_path) == [2]
  assert_trees_equal(saved_state(tmp_path, 2), good)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_processes(workdir, total, every, *extra):
  port = _free_port()
  return [subprocess.Popen(
      main_cmd(workdir, total, every, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}", *extra),
      env=env(devices=4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


@pytest.mark.slow      # two subprocesses, each compiling its steps
def test_two_processes_train_like_one_process(tmp_path):
  """Two processes x 4 CPU devices (jax.distributed on a loopback coordinator)
  reach the same parameters as one process with 8 devices."""
  total = 4
  single = tmp_path / "single"
  run_in_process(single, **toy_overrides(total, total))
  multi = tmp_path / "multi"
  procs = two_processes(multi, total, total)
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, e in zip(procs, errs):
    assert p.returncode == 0, e[-3000:]
  a, b = saved_state(single, total), saved_state(multi, total)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow      # two subprocesses, each compiling its steps
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption service turns a SIGTERM to one process into one agreed step:
  both processes save that step (one checkpoint, written together) and exit as
  preempted; nobody hangs in a collective the other one left."""
  workdir = tmp_path / "multi"
  procs = two_processes(workdir, 100000, 1000)
  wait_for_steps(workdir, procs[0])
  time.sleep(2.0)
  procs[1].send_signal(signal.SIGTERM)
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
  steps = saved_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100000, steps
  assert f"Preempted at step {steps[0]}" in results[0][0]        # process 0's console
  for log in ("log.txt", "log_process1.txt"):
    assert f"Preempted at step {steps[0]}" in (workdir / log).read_text(), log
  assert json.loads((workdir / "status.json").read_text())["state"] == "preempted"


@pytest.mark.slow      # two runs
def test_checkpoint_of_other_network_sizes_is_refused_not_skipped(tmp_path):
  """A size change the config check cannot see (here the heads' input width via the
  toy trunk) must stop the run, not silently start afresh over good checkpoints."""
  run_in_process(tmp_path, **toy_overrides(2, 2))
  config = ml_collections.FrozenConfigDict(small_toy("js", **toy_overrides(4, 2)))
  trainer = train.Trainer(config, registry=REGISTRY)
  abstract = ckpt_lib.abstract(trainer.state)
  bigger = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[:-1] + (a.shape[-1] + 1,)
                                                       if a.ndim else a.shape, a.dtype,
                                                       sharding=a.sharding), abstract)
  mngr = ckpt_lib.manager(str(tmp_path), config)
  with pytest.raises(ValueError, match="does not fit this run's networks"):
    ckpt_lib.restore_latest(mngr, bigger, config)
  assert saved_steps(tmp_path) == [2]


def test_teacher_record_matches_an_identity_with_tuples(tmp_path):
  """teacher.json stores lists; an identity from a frozen config holds tuples: same teacher."""
  identity = {"kind": "sd15_random", "arch": {"unet": {"block_out_channels": (8, 16)}}, "seed": 1}
  ckpt_lib.write_teacher(str(tmp_path), identity)
  ckpt_lib.check_teacher(str(tmp_path), identity)
  other = {**identity, "arch": {"unet": {"block_out_channels": (8, 32)}}}
  with pytest.raises(ckpt_lib.CheckpointError, match="Refusing to resume"):
    ckpt_lib.check_teacher(str(tmp_path), other)
