"""Packaging: every sub-package ships, the console scripts exist, configs load from anywhere.

`pip install -e .` into a fresh environment is slow, so the wheel is built
without dependencies or isolation (setuptools only) from a copy of the
sources, and its file list and entry points are read back.
"""

import ast
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fdistill_jax"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "absl": "absl-py", "ml_collections": "ml-collections",
                 "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-datasets",
                 "ml_dtypes": "ml-dtypes", "sklearn": "scikit-learn"}


def source_packages():
  """Dotted names of every directory of fdistill_jax holding Python files."""
  dirs = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
  return sorted(".".join(d.relative_to(REPO).parts) for d in dirs)


def test_every_subpackage_is_found_by_the_package_discovery():
  setuptools = pytest.importorskip("setuptools")
  found = setuptools.find_packages(where=str(REPO),
                                   **PYPROJECT["tool"]["setuptools"]["packages"]["find"])
  assert sorted(found) == source_packages()
  for name in ("io", "data", "train", "tools", "models", "models.sd", "loaders", "pipelines",
               "metrics", "metrics.t2i", "problems.toy", "problems.digits", "problems.t2i"):
    assert f"fdistill_jax.{name}" in found, name


def _dist_name(requirement):
  name = requirement.split(";")[0]
  for sep in "<>=![ ":
    name = name.split(sep)[0]
  return name.strip().lower().replace("_", "-")


def test_module_level_imports_are_declared_dependencies():
  """Every third-party module the package imports at module level is in [project]
  dependencies (imports inside functions are optional features: the 'sd' and 'digits'
  extras)."""
  declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
  extras = PYPROJECT["project"]["optional-dependencies"]
  optional = {_dist_name(r) for r in extras["sd"] + extras["digits"]}
  missing = {}
  for path in PACKAGE.rglob("*.py"):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "fdistill_jax":
          continue
        dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
        at_module_level = node in tree.body
        if dist not in declared and (at_module_level or dist not in optional):
          missing.setdefault(dist, str(path.relative_to(REPO)))
  assert not missing, f"add to pyproject.toml dependencies: {missing}"


def test_console_scripts_point_at_callables():
  scripts = PYPROJECT["project"]["scripts"]
  assert {"fdistill-train", "fdistill-convert", "fdistill-sample", "fdistill-evaluate",
          "fdistill-sweep", "fdistill-sample-t2i", "fdistill-plot-weights",
          "fdistill-evaluate-t2i", "fdistill-digits-sweep", "fdistill-analysis"} <= set(scripts)
  for name, target in scripts.items():
    module, attr = target.split(":")
    fn = getattr(importlib.import_module(module), attr)
    assert callable(fn), name


def test_wheel_ships_every_module_and_the_console_scripts(tmp_path):
  pytest.importorskip("setuptools")
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(PACKAGE, src / "fdistill_jax", ignore=shutil.ignore_patterns("__pycache__"))
  out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("fdistill_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
  modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
             if "__pycache__" not in p.parts}
  assert modules <= names, sorted(modules - names)
  # Package data read at run time (pyproject's [tool.setuptools.package-data]).
  assert "fdistill_jax/problems/t2i/paper_prompts.jsonl" in names
  for script, target in PYPROJECT["project"]["scripts"].items():
    assert f"{script} = {target}" in entry_points, (script, entry_points)


def test_configs_load_from_another_directory(tmp_path):
  """`--config=/abs/path/configs/X.py` from another working directory, with the package
  importable but the repository not on the path: main parses every config and stops
  (absl's --only_check_args), and an unknown override is one line."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  for name in ("cifar10.py:fkl,runlocal",):   # every config: test_config_commands, in-process
    out = subprocess.run([sys.executable, "-m", "fdistill_jax.main",
                          f"--config={REPO}/configs/{name}", f"--workdir={tmp_path}/w",
                          "--config.seed=3", "--only_check_args"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, (name, out.stderr[-2000:])
  out = subprocess.run([sys.executable, "-m", "fdistill_jax.main",
                        f"--config={REPO}/configs/cifar10.py", f"--workdir={tmp_path}/w",
                        "--config.loss.gan_weigt=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                       timeout=300)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "loss.gan_weight" in out.stderr and "unknown config field" in out.stderr
  assert not (tmp_path / "w").exists()


def test_shared_fixtures_location_can_be_overridden(monkeypatch, tmp_path):
  import conftest  # pylint: disable=g-import-not-at-top
  import sd_helpers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(conftest.FIXTURES_ENV, str(tmp_path))
  assert conftest.shared_fixtures() == tmp_path
  monkeypatch.delenv(conftest.FIXTURES_ENV)
  assert conftest.shared_fixtures() == REPO.parent / "shared" / "fixtures"
  assert sd_helpers.FIXTURES == conftest.SHARED_FIXTURES / "sd15"
