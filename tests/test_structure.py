"""The package's shape: no import cycles, every module imports alone, the loss module
needs only jax and numpy, and the engine names no problem.

The cycle check reads every `import` statement of the package (at any depth:
an import inside a function is still a dependency) and looks for a cycle in
that graph; the isolation check imports each module in a child of a fresh interpreter
that has imported only third-party packages.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fdistill_jax"


def module_name(path):
  rel = path.relative_to(REPO).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def imported_modules(path):
  """fdistill_jax modules a file imports (`import a.b`, `from a import b`, at any depth)."""
  known = set(MODULES)
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    out |= {n for n in names if n in known}
  return out


def import_graph():
  """module -> modules it imports, including the packages whose __init__ runs first."""
  graph = {}
  for path in PACKAGE.rglob("*.py"):
    name = module_name(path)
    deps = set()
    for dep in imported_modules(path):
      parts = dep.split(".")
      deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
  return graph


def find_cycle(graph):
  """A list of modules forming a cycle, or None (iterative depth-first search)."""
  state = {}
  for root in graph:
    if root in state:
      continue
    stack = [(root, iter(sorted(graph.get(root, ()))))]
    path, state[root] = [root], "open"
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        stack.pop()
        path.pop()
        state[node] = "done"
      elif state.get(child) == "open":
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = "open"
        path.append(child)
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return None


def test_find_cycle_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
  assert find_cycle(import_graph()) is None


# Third-party packages every child finds already imported (the check is about the package's
# own modules; importing jax once instead of once per module saves minutes).
PRELOAD = "numpy, jax, jax.numpy, flax.linen, optax, ml_collections, absl.flags, PIL.Image"
IMPORT_EACH_ALONE = f"""
import importlib, os, sys, traceback
import {PRELOAD}
failed = []
for m in sys.argv[1:]:
  pid = os.fork()
  if pid == 0:                      # a child with none of the package's modules imported
    try:
      importlib.import_module(m)
      os._exit(0)
    except BaseException:
      traceback.print_exc(limit=-2)
      os._exit(1)
  if os.waitpid(pid, 0)[1]:
    failed.append(m)
print(failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
  """Each module imports by itself (no order in which another module must come first): a
  fresh interpreter preloads third-party packages only, then imports each module of the
  package in a forked child of its own."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_ENABLE_ONEDNN_OPTS": "0",
         "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_the_isolation_check_sees_a_module_that_needs_another_first(tmp_path):
  """A module that works only after another has been imported fails the check above."""
  pkg = tmp_path / "orderpkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "first.py").write_text("import sys\nsys.modules['orderpkg'].ready = True\n")
  (pkg / "second.py").write_text("import orderpkg\nassert orderpkg.ready\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path)}
  ok = subprocess.run([sys.executable, "-c", "import orderpkg.first, orderpkg.second"],
                      env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]            # in that order, it imports
  result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, "orderpkg.first",
                           "orderpkg.second"], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1 and "['orderpkg.second']" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("module", ["fdistill_jax.losses", "fdistill_jax.divergences"])
def test_loss_module_imports_only_jax_and_numpy(module):
  """Importing the loss module adds no third-party package beyond what jax and numpy load."""
  code = ("import sys\n"
          "import jax, jax.numpy, numpy\n"
          "before = {m.split('.')[0] for m in sys.modules}\n"
          f"import {module}\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} - before))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "['fdistill_jax']", result.stdout


ENGINE = ["fdistill_jax/train", "fdistill_jax/main.py", "fdistill_jax/config_lib.py",
          "fdistill_jax/pipelines/sampling.py", "fdistill_jax/metrics/fid.py"]


def _code_lines(path):
  """The file's lines without comments and docstrings (the words a program acts on)."""
  tree = ast.parse(path.read_text())
  skip = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
        getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
      skip |= set(range(body[0].lineno, body[0].end_lineno + 1))
  return [line.split("#")[0] for i, line in enumerate(path.read_text().splitlines(), 1)
          if i not in skip]


def test_the_engine_names_no_problem():
  """The loop, main and the generic evaluation reach problems only through registries:
  they import nothing from fdistill_jax.problems.toy and their code never says 'toy'."""
  files = [p for entry in ENGINE for p in ((REPO / entry).rglob("*.py") if (REPO / entry).is_dir()
                                           else [REPO / entry])]
  assert len(files) >= 8
  for path in files:
    assert not {d for d in imported_modules(path) if d.startswith("fdistill_jax.problems.toy")}, path
    said = [line for line in _code_lines(path) if "toy" in line.lower()]
    assert not said, (path, said)
