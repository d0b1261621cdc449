"""Checkpoints written before the package moved to its folder layout resume bitwise.

tests/data/old_runs/ holds a tiny toy run and a tiny digits teacher run (configs in
tiny_configs.py there) written by the code at commit 9b29502 (before the move):
each was run to step 6 with checkpoints at 3 and 6, then cut back to its state at
step 3 (checkpoint 3 and the files written at start: config.json, teacher.json,
generator_spec.json) in runs_at_step_3.tar.xz; RUN_final_state.npz is the old
code's state at step 6 (every leaf; the optimiser moments as sha256 digests).
Today's `main`, given the same command, resumes from step 3 and must reach that
state bit for bit. Both runs are one-device subprocesses, as they were written.
See tests/data/old_runs/README.md for how they were made.
"""

import hashlib
import pathlib
import tarfile

import jax
import numpy as np
import pytest

from tests import helpers

DATA = pathlib.Path(helpers.REPO) / "tests" / "data" / "old_runs"


def _flat(state):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.slow          # two subprocess runs, each compiling its steps
@pytest.mark.parametrize("run", ["toy", "digits"])
def test_old_checkpoint_resumes_to_the_old_codes_final_state_bitwise(run, tmp_path):
  with tarfile.open(DATA / "runs_at_step_3.tar.xz") as tar:
    tar.extractall(tmp_path, filter="data")
  workdir = tmp_path / run
  assert helpers.saved_steps(workdir) == [3]
  out = helpers.run_main_subprocess(   # XLA optimised, as the old runs were (conftest)
      [f"--config={DATA / 'tiny_configs.py'}:{run}", f"--workdir={workdir}"], devices=1,
      JAX_DISABLE_MOST_OPTIMIZATIONS="0")
  assert "Running from step 3 of 6" in out.stdout, out.stdout[-2000:]
  got = _flat(helpers.saved_state(workdir, 6))
  want = np.load(DATA / f"{run}_final_state.npz")
  digests = {k[len("sha256:"):] for k in want.files if k.startswith("sha256:")}
  assert set(got) == digests | {k for k in want.files if not k.startswith("sha256:")}
  for key, value in got.items():
    if key in digests:
      digest = np.frombuffer(hashlib.sha256(value.tobytes()).digest(), np.uint8)
      np.testing.assert_array_equal(digest, want["sha256:" + key], err_msg=key)
    else:
      assert value.dtype == want[key].dtype, key
      np.testing.assert_array_equal(value, want[key], err_msg=key)
