"""Launch scripts: every command they issue parses with main's flags into the intended run.

Also: the benchmark's numpy-drawn random teacher is a drop-in for the models' one.

The scripts are run for real with `bash`; `gcloud` and `srun` are replaced by
stubs on PATH that record their arguments, so nothing leaves the machine. The
expected rows (dataset x divergence, two ablations per dataset) are written
out here independently of the scripts.
"""

import json
import os
import shlex
import stat
import subprocess

import pytest

from fdistill_jax import config_lib
from fdistill_jax.tools import sweep
from tests.helpers import parse_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["paper_tables.sh", "tpu_pod.sh", "slurm.sbatch", "toy_sweep.sh"]
C10, IN64 = "configs/cifar10.py", "configs/imagenet64.py"
ENV = {"C10_TEACHER": "/t/c10.pkl", "IN64_TEACHER": "/t/in64.pkl", "C10_ZIP": "/d/c10.zip",
       "IN64_ZIP": "/d/in64.zip", "TFDS_DIR": "/d/tfds", "RUNS": "/r"}


def _bash(script, *args, env=None, cwd=REPO):
  full_env = {**os.environ, **ENV, **(env or {})}
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env, cwd=cwd,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr
  return out.stdout


def _main_argv(command):
  words = shlex.split(command)
  i = words.index("fdistill_jax.main")
  assert words[i - 1] == "-m", command
  return words[i + 1:]


def _table_rows(env=None):
  return [_main_argv(line) for line in _bash("paper_tables.sh", env=env).splitlines()]


def _kind(config):
  """'both' / 'no_gan' / 'gan_only' from the loss weights."""
  f, g = config.loss.fdistill_weight > 0, config.loss.gan_weight > 0
  return {(True, True): "both", (True, False): "no_gan", (False, True): "gan_only"}[(f, g)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
  out = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr


def test_paper_tables_cover_every_row():
  seen = {}
  for argv in _table_rows():
    config, other = parse_main(argv)
    dataset = next(a for a in argv if a.startswith("--config=")).split("=")[1].split(":")[0]
    key = (dataset, config.divergence if _kind(config) != "gan_only" else None, _kind(config))
    assert key not in seen, f"duplicate row {key}"
    seen[key] = (config, other)
  expected = {(ds, d, "both") for ds in (C10, IN64) for d in config_lib.DIVERGENCES}
  expected |= {(C10, "fkl", "no_gan"), (IN64, "js", "no_gan"),
               (C10, None, "gan_only"), (IN64, None, "gan_only")}
  assert set(seen) == expected
  workdirs = [other["workdir"] for _, other in seen.values()]
  assert len(set(workdirs)) == len(workdirs) and all(w.startswith("/r/") for w in workdirs)


def test_paper_tables_pass_teacher_and_data():
  for data, kind in (("edm", "edm"), ("tfds", "tfds")):
    for argv in _table_rows({"DATA": data}):
      config, _ = parse_main(argv)
      c10 = config.data.resolution == 32
      assert config.teacher.path == ("/t/c10.pkl" if c10 else "/t/in64.pkl")
      assert config.data.kind == kind
      if kind == "edm":
        assert config.data.path == ("/d/c10.zip" if c10 else "/d/in64.zip")
      else:
        assert config.data.data_dir == "/d/tfds"
      config_lib.validate(config, num_devices=8)     # batch divides 8 devices, etc.


def test_paper_tables_rejects_unknown_data():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "paper_tables.sh")], cwd=REPO,
                       env={**os.environ, "DATA": "zip"}, capture_output=True, text=True,
                       check=False)
  assert out.returncode != 0 and "expected 'edm'" in out.stderr


def _stub(tmp_path, name):
  """An executable `name` on PATH that appends its argv (one JSON list per call) to a log."""
  log = tmp_path / f"{name}.log"
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(f'#!/usr/bin/env python3\nimport json, sys\n'
                  f'open({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return {"PATH": f"{path.parent}:{os.environ['PATH']}"}, log


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_tpu_pod_run_starts_main_on_every_worker(tmp_path):
  env, log = _stub(tmp_path, "gcloud")
  _bash("tpu_pod.sh", "run", env={**env, "CONFIG": "configs/imagenet64.py:js",
                                  "WORKDIR": "/mnt/gcs/runs/x", "TPU_NAME": "pod"})
  (call,) = _calls(log)
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in call
  remote = next(a for a in call if a.startswith("--command="))[len("--command="):]
  python_cmd = remote.split("&&")[-1].split(">")[0]
  config, other = parse_main(_main_argv(python_cmd))
  assert other == {"workdir": "/mnt/gcs/runs/x", "multihost": True}
  assert (config.divergence, config.data.kind, config.data.resolution) == ("js", "edm", 64)
  assert config.teacher.path.endswith(".pkl") and config.data.path.endswith(".zip")


def test_tpu_pod_without_command_prints_usage():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 2 and "usage" in out.stderr


def _sbatch_directives():
  out = {}
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    for line in f:
      if line.startswith("#SBATCH --"):
        key, _, value = line[len("#SBATCH --"):].strip().partition("=")
        out[key] = value
  return out


def test_slurm_runs_one_process_per_gpu(tmp_path):
  d = _sbatch_directives()
  assert d["ntasks-per-node"] == d["gpus-per-node"]       # one task per GPU, see the header
  assert "gpus-per-task" not in d
  env, log = _stub(tmp_path, "srun")
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  (tmp_path / "venv" / "bin" / "activate").write_text("")
  _bash("slurm.sbatch", env={**env, "SLURM_SUBMIT_DIR": REPO, "VENV": str(tmp_path / "venv"),
                             "WORKDIR": str(tmp_path / "run"), "TEACHER": "/t/c10.pkl",
                             "DATA_PATH": "/d/c10.zip",
                             "EXTRA_FLAGS": "--config.batch_size=1024"})
  (call,) = _calls(log)
  assert "--gpu-bind=none" in call
  config, other = parse_main(_main_argv(" ".join(shlex.quote(a) for a in call)))
  assert other == {"workdir": str(tmp_path / "run"), "multihost": True}
  assert (config.divergence, config.batch_size, config.teacher.path, config.data.path) == (
      "fkl", 1024, "/t/c10.pkl", "/d/c10.zip")


def test_toy_sweep_calls_the_sweep_module_with_its_flags(tmp_path):
  env, log = _stub(tmp_path, "fakepython")
  _bash("toy_sweep.sh", "--set=total_steps=7",
        env={**env, "PYTHON": "fakepython", "WORKDIR": "/w", "SEEDS": "3,4"})
  (call,) = _calls(log)
  assert call == ["-m", "fdistill_jax.tools.sweep", "--config=configs/toy2d.py", "--workdir=/w",
                  "--seeds=3,4", "--set=total_steps=7"]
  assert {a[2:].split("=")[0] for a in call[2:]} <= set(sweep.FLAGS), set(sweep.FLAGS)


# ---------------------------------------------------------------------------
# Dry runs: every launcher prints what it would execute and runs nothing.

BARE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}   # no SLURM_*, no srun or gcloud


def _bare(script, *args, env=None, cwd=REPO):
  """`bash launch/SCRIPT ARGS` in an environment without SLURM, srun or gcloud."""
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args],
                        env={**BARE_ENV, **(env or {})}, cwd=cwd, capture_output=True,
                        text=True, check=False)


def _main_line(text):
  (line,) = [line for line in text.splitlines() if "fdistill_jax.main" in line]
  return line


def test_slurm_dry_run_under_plain_bash(tmp_path):
  """No SLURM variables set (the old script died on SLURM_SUBMIT_DIR: unbound variable)."""
  out = _bare("slurm.sbatch", env={"DRY_RUN": "1", "WORKDIR": str(tmp_path / "run")},
              cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f"source {tmp_path}/.venv/bin/activate" and lines[1] == f"cd {tmp_path}"
  words = shlex.split(_main_line(out.stdout))
  assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none"]
  config, other = parse_main(_main_argv(" ".join(shlex.quote(w) for w in words)))
  assert other == {"workdir": str(tmp_path / "run"), "multihost": True}
  assert config.data.path == f"{tmp_path}/datasets/cifar10-32x32.zip"
  assert not (tmp_path / "run").exists()                  # nothing was executed


def test_slurm_without_srun_says_what_to_do(tmp_path):
  out = _bare("slurm.sbatch", cwd=tmp_path)
  assert out.returncode == 2 and "DRY_RUN=1" in out.stderr and "sbatch" in out.stderr
  assert "unbound" not in out.stderr


@pytest.mark.parametrize("command", ["create", "setup", "run", "logs", "stop", "delete"])
def test_tpu_pod_dry_run_prints_gcloud_commands(command, tmp_path):
  out = _bare("tpu_pod.sh", command, env={"DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(("gcloud compute tpus tpu-vm ", "git archive ")), out.stdout
  assert out.stdout.count("gcloud compute tpus tpu-vm ") == (2 if command == "setup" else 1)
  syntax = subprocess.run(["bash", "-n", "-c", out.stdout], capture_output=True, text=True,
                          check=False)
  assert syntax.returncode == 0, (out.stdout, syntax.stderr)   # printed as valid shell


def _env_and_command(line):
  """'env A=1 B=2 cmd args' -> ({A: 1, B: 2}, [cmd, args])."""
  words = shlex.split(line)
  assert words[0] == "env", line
  env, i = {}, 1
  while "=" in words[i] and not words[i].startswith("-"):
    key, value = words[i].split("=", 1)
    env[key], i = value, i + 1
  return env, words[i:]


@pytest.mark.parametrize("launcher", ["slurm", "tpu_pod"])
def test_paper_table_rows_through_each_launcher_are_the_same_runs(launcher):
  """LAUNCHER=slurm|tpu_pod prints, per row, a launcher line; run with DRY_RUN=1, the
  launcher issues the same main command (config, variant, teacher, data) as the row's
  local line. (The old header pointed at a RUN_FLAGS variable no launcher defines.)"""
  extra = {"EXTRA_FLAGS": "--config.seed=5 --config.log_every=7"}
  local = [parse_main(argv) for argv in _table_rows(extra)]
  lines = _bash("paper_tables.sh", env={"LAUNCHER": launcher, **extra}).splitlines()
  assert len(lines) == len(local) == 16
  for line, (want, want_other) in zip(lines, local):
    env, command = _env_and_command(line)
    script = {"slurm": ["sbatch", "launch/slurm.sbatch"],
              "tpu_pod": ["bash", "launch/tpu_pod.sh", "run"]}[launcher]
    assert command == script, command
    out = _bare(os.path.basename(script[1]), *script[2:], env={**env, "DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    main_line = _main_line(out.stdout)
    if launcher == "tpu_pod":                              # the remote command of `ssh`
      remote = next(w for w in shlex.split(main_line) if w.startswith("--command="))
      main_line = remote.split("&&")[-1].split(">")[0]
    config, other = parse_main(_main_argv(main_line))
    assert other["multihost"] and other["workdir"] == want_other["workdir"]
    for field in ("divergence", "loss.gan_weight", "loss.fdistill_weight", "seed", "log_every",
                  "data.kind", "data.resolution"):
      assert _get(config, field) == _get(want, field), (line, field)
    if launcher == "slurm":
      assert (config.teacher.path, config.data.path) == (want.teacher.path, want.data.path)
    else:                                   # copied from GCS to each worker's local disk
      assert os.path.basename(config.teacher.path) == os.path.basename(want.teacher.path)
      assert os.path.basename(config.data.path) == os.path.basename(want.data.path)


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("env, message", [({"LAUNCHER": "k8s"}, "expected local, slurm"),
                                          ({"LAUNCHER": "slurm", "DATA": "tfds"}, "DATA=edm")])
def test_paper_tables_rejects_bad_launcher_settings(env, message):
  out = _bare("paper_tables.sh", env=env)
  assert out.returncode == 2 and message in out.stderr and out.stdout == ""
