"""Every CLI runs through absl's runner: --help prints the tool's own flags and exits 0,
a bad flag is one line and exit code 2, a user's mistake one line and exit code 1."""

import importlib
import os
import pathlib
import subprocess
import sys

from absl import flags
import pytest

from fdistill_jax import main as main_lib
from fdistill_jax.tools import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (REPO / "fdistill_jax" / "tools").glob("*.py")
               if p.stem not in ("__init__", "cli"))


@pytest.mark.parametrize("name", TOOLS)
def test_tool_help_prints_its_flags_and_exits_0(name, capsys):
  module = importlib.import_module(f"fdistill_jax.tools.{name}")
  parse = cli.flags_parser(module.FLAGS, name, module.__doc__)
  with pytest.raises(SystemExit) as e:
    parse([name, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  own = [f.name for f in module.FLAGS.flags_by_module_dict().get(module.__name__, [])]
  assert own and all(f"--{n}" in out or f"--[no]{n}" in out for n in own), out
  assert "--flagfile" not in out and "fdistill_jax/tools" not in out, out


def test_main_help_prints_its_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as e:
    main_lib.parse_flags(["main", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in ("config", "workdir", "multihost", "process_id"):
    assert f"--{name}" in out or f"--[no]{name}" in out, out


def test_a_tool_runs_through_absl_app_run():
  """`python -m fdistill_jax.tools.convert`: --help exit 0; an unknown flag one line, exit 2;
  a missing input file one line, exit 1; absl's own --only_check_args is understood."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  def run(*args):
    return subprocess.run([sys.executable, "-m", "fdistill_jax.tools.convert", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False, timeout=300)
  out = run("--help")
  assert out.returncode == 0 and "--input" in out.stdout, out
  out = run("--input=a", "--output=b", "--bogus=1")
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      "convert: error: Unknown command line flag 'bogus' (see --help)"], out.stderr
  out = run("--input=/nonexistent.pkl", "--output=/tmp/unused_out")
  assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "/nonexistent.pkl" in out.stderr
  assert run("--input=a", "--output=b", "--only_check_args").returncode == 0


def test_invoke_resets_the_flags_between_calls():
  fv = cli.new_flags()
  flags.DEFINE_integer("n", 1, "", flag_values=fv)
  seen = []
  assert cli.invoke(lambda argv: seen.append(fv.n), "t", fv, ["--n=5"]) == 0
  assert cli.invoke(lambda argv: seen.append(fv.n), "t", fv, []) == 0
  assert seen == [5, 1]
