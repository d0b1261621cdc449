"""Running hostile cases in a subprocess under a memory limit (see tests/hostile_runner.py).

Not a test module: `run_cases` and the assertions used by test_hostile_files.py
and test_lost_work.py. One subprocess runs a whole group of cases (importing
jax and TensorFlow costs seconds per process) and reports each as JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
# The address-space limit (RLIMIT_AS) of the hostile runs: 4 GiB, the bound the project
# promises (jax and TensorFlow take about 3 GiB of it once imported).
MEMORY_GIB = float(os.environ.get("FDISTILL_HOSTILE_GIB", 4))


def env(devices=8):
  e = dict(os.environ)
  e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
           PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""),
           JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="3")
  return e


def run_cases(cases, workdir, timeout=600, gib=MEMORY_GIB):
  """Runs `cases` in one subprocess under RLIMIT_AS; returns {case id: result dict}."""
  workdir = pathlib.Path(workdir)
  cases_file, out_file = workdir / "_cases.json", workdir / "_results.jsonl"
  cases_file.write_text(json.dumps(cases))
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "hostile_runner.py"),
                         str(cases_file), str(out_file), str(gib)],
                        env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
  results = {}
  if out_file.exists():
    results = {r["id"]: r for r in map(json.loads, out_file.read_text().splitlines())}
  done = set(results)
  missing = [c["id"] for c in cases if c["id"] not in done]
  assert not missing, (f"the runner died (rc {proc.returncode}) before cases {missing}:\n"
                       f"{proc.stderr[-3000:]}")
  cases_file.unlink()
  out_file.unlink()
  return results


def error_lines(result, tool):
  return [line for line in result["stderr"].splitlines() if line.startswith(f"{tool}: error:")]


def assert_refused(result, tool, fragment, max_seconds=60):
  """Exit code 1, exactly one line 'TOOL: error: ...' naming the problem, no traceback."""
  assert result["traceback"] is None, result["traceback"][-3000:]
  assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
  lines = error_lines(result, tool)
  assert result["rc"] == 1 and len(lines) == 1, (result["rc"], result["stderr"][-3000:])
  assert fragment in lines[0], (fragment, lines[0])
  assert result["seconds"] < max_seconds, result["seconds"]


def tree(directory):
  """{relative path: bytes} of every file under `directory` (to show nothing changed)."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}
