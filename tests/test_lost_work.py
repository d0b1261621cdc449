"""No command loses a user's work: workdir checks, refused resumes, corrupt and non-finite
checkpoints, two runs on one workdir, exports onto a run, SIGTERM during start-up.

The cases run in one subprocess under a memory limit (tests/hostile.py), each
through `fdistill_jax.main.main` or a tool exactly as on the command line; runs
are the toy config shrunk to 2x32 MLPs (tests/helpers.py). A `digest`
case records a workdir's files (sha256) so that a refused command can be shown
to have changed nothing.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import hostile
from tests.helpers import TOY_FLAGS

# Hostile runs in subprocesses, about 3 minutes; the group keeps the tests of the `results`
# fixture on one xdist worker (pyproject's --dist=loadgroup), so its runs are made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("lost_work_results")]

CONFIG = f"--config={hostile.REPO}/configs/toy2d.py:js"


def main_case(cid, workdir, total=4, every=2, *extra, variant="js"):
  args = [f"--config={hostile.REPO}/configs/toy2d.py:{variant}", f"--workdir={workdir}",
          f"--config.total_steps={total}", f"--config.checkpoint_every={every}", *TOY_FLAGS,
          *extra]
  return {"id": cid, "tool": "main", "args": args}


def call(cid, name, **kwargs):
  return {"id": cid, "call": name, "kwargs": kwargs}


def readonly_dir(root):
  """A directory this process cannot create files in (root ignores permission bits)."""
  if os.geteuid() == 0:
    return "/sys/kernel" if os.path.isdir("/sys/kernel") else None
  path = root / "readonly"
  path.mkdir()
  path.chmod(0o555)
  return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("lost_work")
  (root / "a_file").write_text("mine")
  w1, w2, w3 = root / "w1", root / "w2", root / "w3"
  ro = readonly_dir(root)
  cases = [
      main_case("workdir_is_file", root / "a_file"),
      main_case("keep_checkpoints_0", root / "k", 4, 2, "--config.keep_checkpoints=0"),
      main_case("num_bins_0", root / "k", 4, 2, "--config.loss.num_bins=0"),
      main_case("sigma_init_0", root / "k", 4, 2, "--config.loss.sigma_init=0.0"),
      # w1: a finished run, then refused resumes that must leave it as it was.
      main_case("w1_run", w1),
      call("w1_digest_before", "digest", directory=str(w1)),
      main_case("w1_other_divergence", w1, 6, 2, variant="fkl"),
      main_case("w1_other_teacher", w1, 6, 2, "--config.toy.fit_seed=7"),
      call("w1_locked", "main_while_locked", workdir=str(w1),
           args=main_case("", w1, 6, 2)["args"]),
      {"id": "w1_export_onto_run", "tool": "sample",
       "args": [f"--workdir={w1}", f"--export={w1}", "--overwrite"]},
      {"id": "w1_export_onto_parent", "tool": "sample",
       "args": [f"--workdir={w1}", f"--export={root}", "--overwrite"]},
      call("w1_digest_after", "digest", directory=str(w1)),
      main_case("w1_other_teacher_allowed", w1, 6, 2, "--config.toy.fit_seed=7",
                "--config.teacher.allow_mismatch=True"),
      # w2: the newest checkpoint is corrupt: moved aside, the run continues, no crash loop.
      main_case("w2_run", w2),
      call("w2_truncate", "truncate_checkpoint", workdir=str(w2), step=4),
      main_case("w2_resume", w2, 6, 2),
      main_case("w2_resume_again", w2, 8, 2),
      # w3: exploding learning rates after a good checkpoint, keeping a single checkpoint.
      main_case("w3_run", w3, 2, 2, "--config.keep_checkpoints=1"),
      main_case("w3_explode", w3, 40, 2, "--config.keep_checkpoints=1",
                "--config.optim.fake_lr=1e39", "--config.optim.disc_lr=1e39"),
      call("w3_finite", "finite_checkpoints", workdir=str(w3)),
  ]
  if ro:
    cases.insert(1, main_case("workdir_readonly", ro))
  got = hostile.run_cases(cases, root, timeout=1200)
  return got, root


def test_workdir_that_is_a_file_fails_before_the_teacher_loads(results):
  got, root = results
  hostile.assert_refused(got["workdir_is_file"], "main", "exists and is not a directory", 30)
  assert "Building the run" not in got["workdir_is_file"]["stdout"]
  assert (root / "a_file").read_text() == "mine"


def test_readonly_workdir_fails_before_the_teacher_loads(results):
  got, _ = results
  if "workdir_readonly" not in got:
    pytest.skip("no read-only directory available")
  hostile.assert_refused(got["workdir_readonly"], "main", "is not writable", 30)
  assert "Building the run" not in got["workdir_readonly"]["stdout"]


@pytest.mark.parametrize("cid, fragment", [
    ("keep_checkpoints_0", "keep_checkpoints=0 must be >= 1"),
    ("num_bins_0", "loss.num_bins=0 must be an integer >= 1"),
    ("sigma_init_0", "loss.sigma_init=0.0 must be a positive finite noise level")])
def test_bad_settings_fail_at_start(results, cid, fragment):
  got, root = results
  hostile.assert_refused(got[cid], "main", fragment, 30)
  assert not (root / "k").exists()


@pytest.mark.parametrize("cid, fragment", [
    ("w1_other_divergence", "divergence: checkpoint has 'js', config has 'fkl'"),
    ("w1_other_teacher", "Refusing to resume: the run in"),
    ("w1_locked", "is in use by process"),
    ("w1_export_onto_run", "is (or contains) the run workdir"),
    ("w1_export_onto_parent", "is (or contains) the run workdir")])
def test_refused_commands_leave_the_run_untouched(results, cid, fragment):
  got, _ = results
  assert got["w1_run"]["rc"] == 0, got["w1_run"]["stderr"][-3000:]
  tool = "sample" if "export" in cid else "main"
  hostile.assert_refused(got[cid], tool, fragment)
  before = json.loads(got["w1_digest_before"]["stdout"])
  assert "generator_spec.json" in before and "teacher.json" in before
  assert json.loads(got["w1_digest_after"]["stdout"]) == before


def test_lock_names_the_holder(results):
  got, _ = results
  line = hostile.error_lines(got["w1_locked"], "main")[0]
  assert re.search(r"is in use by process \d+ on \S+ \(since ", line), line


def test_teacher_mismatch_can_be_allowed(results):
  got, root = results
  case = got["w1_other_teacher_allowed"]
  assert case["rc"] == 0 and case["traceback"] is None, case["stderr"][-3000:]
  assert "teacher.allow_mismatch=True" in case["stderr"]
  assert json.loads((root / "w1" / "status.json").read_text())["step"] == 6


def test_corrupt_checkpoint_is_moved_aside_and_the_run_continues(results):
  got, root = results
  for cid in ("w2_run", "w2_resume", "w2_resume_again"):
    assert got[cid]["rc"] == 0 and got[cid]["traceback"] is None, got[cid]["stderr"][-3000:]
  assert "Moved the unreadable checkpoint of step 4" in got["w2_resume"]["stderr"]
  aside = list((root / "w2" / "checkpoints_unreadable").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("4-")      # kept, not deleted
  steps = sorted(int(p.name) for p in (root / "w2" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps[-1] == 8 and 4 in steps                            # step 4 saved again
  assert "unreadable" not in got["w2_resume_again"]["stderr"]


def test_non_finite_state_is_never_saved_and_the_good_checkpoint_is_kept(results):
  got, _ = results
  assert got["w3_run"]["rc"] == 0, got["w3_run"]["stderr"][-3000:]
  hostile.assert_refused(got["w3_explode"], "main", "Non-finite values at step", 120)
  assert "last good checkpoint (step" in hostile.error_lines(got["w3_explode"], "main")[0] or (
      "last good checkpoint is kept" in hostile.error_lines(got["w3_explode"], "main")[0])
  finite = json.loads(got["w3_finite"]["stdout"])
  assert finite and all(finite.values()), finite
  assert min(int(s) for s in finite) >= 2


def test_sigterm_during_startup_exits_143_with_the_message(tmp_path):
  """SIGTERM while the toy teacher is being fitted: exit 143, one message, nothing saved."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fdistill_jax.main", CONFIG, f"--workdir={workdir}",
         "--config.total_steps=4", *TOY_FLAGS, "--config.toy.fit_steps=20000"]
  proc = subprocess.Popen(cmd, env=hostile.env(), cwd=hostile.REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  log = workdir / "log.txt"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and "Building the run" in log.read_text():
      break
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "Preempted during start-up at step 0" in out
  assert "Traceback" not in err
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  assert not (workdir / "metrics.json").exists()


def test_state_check_names_the_non_finite_arrays():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import loop  # pylint: disable=g-import-not-at-top
  state = {"gen": {"w": jnp.ones(3)}, "fake": {"w": jnp.array([1.0, jnp.inf])},
           "step": jnp.int32(3)}
  assert ckpt_lib.nonfinite_leaves(state) == ["['fake']['w']"]
  with pytest.raises(FloatingPointError, match=r"in 1 arrays of the training state \(first: "
                     r"\['fake'\]\['w'\]\); nothing was saved and the last good checkpoint "
                     r"\(step 2\) is kept"):
    loop.check_state_finite(state, 5, 2)
  loop.check_state_finite({"gen": {"w": jnp.ones(3)}}, 5, 2)      # finite: no error
