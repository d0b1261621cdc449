"""Outputs never replace what the user did not ask to replace (docs/security.md), in-process.

The slow end-to-end cases (real runs, subprocesses) are in tests/test_lost_work.py;
these build their own folders and check each refusal and that every user file
is intact afterwards.
"""

import json
import os

import numpy as np
import pytest

from fdistill_jax.io import atomic
from fdistill_jax.tools import cli
from fdistill_jax.tools import evaluate as evaluate_tool
from fdistill_jax.tools import sample as sample_tool
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop
from tests import hostile


def _fill(tmp):
  os.makedirs(os.path.join(tmp, "params", "sub"))
  with open(os.path.join(tmp, "params", "sub", "w.bin"), "wb") as f:
    f.write(b"weights")
  with open(os.path.join(tmp, "spec.json"), "w") as f:
    f.write("{}")


def _ours(tmp_path):
  out = str(tmp_path / "export")
  atomic.write_dir(out, _fill)
  return out


def test_manifest_lists_every_file_recursively_with_its_hash(tmp_path):
  out = _ours(tmp_path)
  record = json.loads(open(os.path.join(out, atomic.MARKER)).read())
  assert record["files"] == atomic.manifest(out)
  assert sorted(record["files"]) == ["params/sub/w.bin", "spec.json"]
  atomic.write_dir(out, _fill, overwrite=True)        # an untouched output is replaced
  assert sorted(atomic.manifest(out)) == ["params/sub/w.bin", "spec.json"]


@pytest.mark.parametrize("spoil, fragment", [
    (lambda out: open(os.path.join(out, "params", "sub", "thesis.tex"), "w").write("mine"),
     "params/sub/thesis.tex"),
    (lambda out: open(os.path.join(out, "spec.json"), "w").write('{"edited": 1}'), "spec.json"),
    (lambda out: open(os.path.join(out, atomic.MARKER), "w").write("{not json"),
     "is unreadable or lists no files"),
    (lambda out: open(os.path.join(out, atomic.MARKER), "w").write(
        json.dumps({"tool": "x", "entries": ["params", "spec.json"]})),
     "is unreadable or lists no files"),
    (lambda out: os.remove(os.path.join(out, atomic.MARKER)), "was not written by fdistill_jax"),
])
def test_overwrite_refuses_anything_it_cannot_prove_it_wrote(tmp_path, spoil, fragment):
  out = _ours(tmp_path)
  spoil(out)
  before = hostile.tree(out)
  with pytest.raises(atomic.OutputError) as e:
    atomic.write_dir(out, _fill, overwrite=True)
  assert fragment in str(e.value) and "\n" not in str(e.value)
  assert hostile.tree(out) == before


def _run_dir(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "status.json").write_text('{"state": "finished", "step": 4}')
  (run / "generator_spec.json").write_text('{"kind": "toy"}')
  return run


def test_output_files_are_never_inputs_or_files_of_a_run(tmp_path):
  run = _run_dir(tmp_path)
  mine = tmp_path / "mine.npz"
  mine.write_bytes(b"samples")
  check = atomic.check_output_file
  with pytest.raises(atomic.OutputError, match="is \\(or lies inside\\) the input"):
    check(str(mine), overwrite=True, inputs=[str(mine)])
  with pytest.raises(atomic.OutputError, match="is \\(or lies inside\\) the input"):
    check(str(run / "generator_spec.json"), overwrite=True, inputs=[str(run)])
  with pytest.raises(atomic.OutputError, match="a file of the run"):
    check(str(run / "status.json"), overwrite=True, protected=ckpt_lib.is_run_workdir)
  with pytest.raises(atomic.OutputError, match="exists: choose another path, or pass "):
    check(str(mine))
  check(str(mine), overwrite=True)                    # named by the flag: allowed
  check(str(run / "new_samples.npz"), inputs=[str(run)])   # a new file in the run: allowed


def test_tools_refuse_outputs_before_any_work(tmp_path, capsys):
  run = _run_dir(tmp_path)
  samples = tmp_path / "S.npz"
  np.savez(samples, images=np.zeros((2, 8, 8, 3), np.uint8))
  before = {**hostile.tree(tmp_path)}
  rc = cli.invoke(evaluate_tool.main, "evaluate", evaluate_tool.FLAGS,
                  [f"--samples={samples}", f"--ref={samples}", "--inception=random",
                   f"--out={samples}", "--overwrite"])
  assert rc == 1 and "is (or lies inside) the input" in capsys.readouterr().err
  rc = cli.invoke(sample_tool.main, "sample", sample_tool.FLAGS,
                  [f"--workdir={run}", f"--out={run / 'generator_spec.json'}", "--overwrite"])
  assert rc == 1 and "is (or lies inside) the input" in capsys.readouterr().err
  rc = cli.invoke(sample_tool.main, "sample", sample_tool.FLAGS,
                  [f"--workdir={run}", f"--out={samples}"])     # exists, no --overwrite
  err = capsys.readouterr().err
  assert rc == 1 and "exists: choose another path, or pass --overwrite" in err, err
  assert hostile.tree(tmp_path) == before


def test_train_refuses_a_users_folder(tmp_path):
  folder = tmp_path / "thesis"
  folder.mkdir()
  (folder / "config.json").write_text('{"mine": true}')
  with pytest.raises(ckpt_lib.CheckpointError, match="not a run of this project.*config.json"):
    ckpt_lib.check_run_target(str(folder))
  with pytest.raises(ckpt_lib.CheckpointError, match="not a run of this project"):
    loop.check_workdir(str(folder), foreign_ok=False)     # what `main --workdir` runs
  assert loop.check_workdir(str(folder)) == str(folder)    # library callers: their choice
  ckpt_lib.check_run_target(str(tmp_path / "new"))          # new, empty or a run: fine
  ckpt_lib.check_run_target(str(_run_dir(tmp_path)))
  (tmp_path / "started").mkdir()
  (tmp_path / "started" / "run.lock").write_text("")
  (tmp_path / "started" / "log.txt").write_text("")
  ckpt_lib.check_run_target(str(tmp_path / "started"))


class _FailingManager:
  """An orbax manager whose pending save failed (a full disk) after leaving its temporary."""

  def __init__(self, workdir):
    self.closed = False
    os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-17", "state"))
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))

  def wait_until_finished(self):
    raise OSError(28, "No space left on device")

  def close(self):
    self.closed = True


def test_a_failed_run_says_so_and_leaves_no_temporary_checkpoint(tmp_path):
  workdir = str(_run_dir(tmp_path))
  mngr = _FailingManager(workdir)
  with pytest.raises(OSError, match="No space left"):
    loop._close_manager(mngr, workdir)
  assert mngr.closed
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  loop._record_failure(workdir, 6, OSError(28, "No space left on device"))
  status = json.loads(open(os.path.join(workdir, "status.json")).read())
  assert status == {"state": "failed", "step": 6,
                    "error": "OSError: [Errno 28] No space left on device"}
  loop._record_failure(workdir, 7, KeyboardInterrupt())
  assert json.loads(open(os.path.join(workdir, "status.json")).read())["state"] == "interrupted"


def test_library_tracebacks_stay_off_the_console_but_reach_the_log_file(tmp_path):
  """orbax logs a traceback per failed write (through absl): the log file keeps them."""
  import io  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from fdistill_jax import console  # pylint: disable=g-import-not-at-top
  root = logging.getLogger()
  saved, level = root.handlers[:], root.level
  stream = io.StringIO()
  root.handlers[:] = [logging.StreamHandler(stream)]
  try:
    console.quiet_console()
    with console.log_to_file(str(tmp_path / "log.txt")):
      try:
        raise OSError(28, "No space left on device")
      except OSError:
        logging.getLogger("absl").error("write failed", exc_info=True)
  finally:
    root.handlers[:], root.level = saved, level
  assert "Traceback" not in stream.getvalue() and "write failed" not in stream.getvalue()
  log = (tmp_path / "log.txt").read_text()
  assert "write failed" in log and "Traceback" in log and "No space left" in log
