"""The package's layering rule, asserted on the source (docs/design.md, "Layering").

Every check reads every `import` statement of the package by AST, at any depth
(an import inside a function is still a dependency):

* `divergences` and `losses` import only jax, numpy, the standard library and
  each other;
* `models/` (Flax modules only) imports no `loaders`, `train` or `problems`;
* the engine (`train/`, `data/`, `metrics/`, `pipelines/`, `models/`, `loaders/`,
  `io/` and the top-level library modules) imports no module of `problems/`;
  outside `problems/` only the composition root `fdistill_jax.plugins` and the
  problem-specific tools do, and no problem imports another;
* `loaders/` imports no `train`;
* no import cycle between modules, nor between sub-packages;
* every module imports alone in a fresh interpreter;
* a registry of the toy alone (and the engine's loop) loads no Stable Diffusion
  module, no `transformers`, `tokenizers` or `torch` (a subprocess);
* in tests/, `pytest.mark.slow` decorates only what pytest collects (else the test it
  was meant for runs in the default tier).
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


def all_imports(path):
  """Every dotted name a file imports (`import a.b` -> a.b; `from a import b` -> a and
  a.b), at any depth. Relative imports are refused: the house style spells them out."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0 and node.module, f"{path}:{node.lineno}: relative import"
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


def imported_modules(path):
  """fdistill_jax modules a file imports (`import a.b`, `from a import b`, at any depth)."""
  return all_imports(path) & set(MODULES)


def module_path(name):
  path = REPO.joinpath(*name.split("."))
  return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def modules_under(*prefixes):
  return [m for m in MODULES if any(m == p or m.startswith(p + ".") for p in prefixes)]


def offending(modules, forbidden):
  """{module: sorted imports of it that start with one of `forbidden`}, only non-empty ones."""
  out = {}
  for m in modules:
    bad = {d for d in all_imports(module_path(m))
           if any(d == f or d.startswith(f + ".") for f in forbidden)}
    if bad:
      out[m] = sorted(bad)
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


def package_of(module):
  """The node of the package graph: fdistill_jax.X for a sub-package or top-level module,
  fdistill_jax.problems.NAME for a problem."""
  parts = module.split(".")
  return ".".join(parts[:3] if parts[1:2] == ["problems"] and len(parts) > 2 else parts[:2])


def package_graph():
  """sub-package -> sub-packages its modules import (the package root left out)."""
  graph = {}
  for m in MODULES:
    if m == "fdistill_jax":
      continue
    deps = {package_of(d) for d in imported_modules(module_path(m)) if d != "fdistill_jax"}
    graph.setdefault(package_of(m), set()).update(deps - {package_of(m)})
  return graph


def test_no_import_cycles_between_packages():
  """The sub-packages form a layered graph: no two import each other, even through others
  (the engine and the problems used to form one strongly connected component)."""
  graph = package_graph()
  assert find_cycle(graph) is None, find_cycle(graph)
  assert {"fdistill_jax.train", "fdistill_jax.problems.toy", "fdistill_jax.plugins"} <= set(graph)


def test_the_layering_checks_see_a_lazy_import(tmp_path):
  """The AST reading finds an import inside a function, so a lazy import cannot hide."""
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from fdistill_jax.problems.toy import problem\n  return problem\n")
  assert "fdistill_jax.problems.toy.problem" in all_imports(path)


STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize("module", ["fdistill_jax.divergences", "fdistill_jax.losses"])
def test_the_loss_library_imports_only_jax_numpy_and_the_stdlib(module):
  allowed = STDLIB | {"jax", "numpy", "fdistill_jax", "fdistill_jax.divergences",
                      "fdistill_jax.losses"}
  bad = {d for d in all_imports(module_path(module))
         if d.split(".")[0] not in allowed and d not in allowed
         and not d.startswith(("fdistill_jax.divergences.", "fdistill_jax.losses."))}
  assert not bad, (module, sorted(bad))


def test_models_import_no_loaders_train_or_problems():
  """models/ holds Flax modules only: reading files and training are layers above."""
  models = modules_under("fdistill_jax.models")
  assert len(models) >= 10
  assert not offending(models, ["fdistill_jax.loaders", "fdistill_jax.train",
                                "fdistill_jax.problems", "fdistill_jax.plugins"])


ENGINE_PACKAGES = ["fdistill_jax.train", "fdistill_jax.data", "fdistill_jax.metrics",
                   "fdistill_jax.pipelines", "fdistill_jax.models", "fdistill_jax.loaders",
                   "fdistill_jax.io", "fdistill_jax.divergences", "fdistill_jax.losses",
                   "fdistill_jax.console", "fdistill_jax.config_lib"]


def test_the_engine_imports_no_problem():
  """The engine reaches the problems only through the registry it is handed."""
  engine = modules_under(*ENGINE_PACKAGES)
  assert len(engine) >= 60
  assert not offending(engine, ["fdistill_jax.problems", "fdistill_jax.plugins"])


def test_only_the_composition_root_and_tools_import_the_problems():
  """Outside problems/, `fdistill_jax.plugins` imports every problem; a problem-specific
  tool may import its problem's helpers; `main` takes the registry from the root."""
  outside = [m for m in MODULES if not m.startswith("fdistill_jax.problems")]
  importers = set(offending(outside, ["fdistill_jax.problems"]))
  assert "fdistill_jax.plugins" in importers
  assert importers - {"fdistill_jax.plugins"} <= PROBLEM_TOOLS, sorted(importers)


# The tools of one problem (the digits table, a diffusers SD model); the generic tools
# (sample, evaluate, sweep, ...) reach problems through the registry only.
PROBLEM_TOOLS = {"fdistill_jax.tools.digits_sweep", "fdistill_jax.tools.sample_t2i"}


def test_no_problem_imports_another():
  """Each problem is a plugin on its own: it imports the engine, never another problem."""
  names = sorted({m.split(".")[2] for m in MODULES
                  if m.startswith("fdistill_jax.problems.")})
  assert {"image", "toy", "digits", "t2i"} <= set(names)
  for name in names:
    own = modules_under(f"fdistill_jax.problems.{name}")
    others = [f"fdistill_jax.problems.{n}" for n in names if n != name] + [
        "fdistill_jax.plugins"]
    assert not offending(own, others), name
    assert f"fdistill_jax.problems.{name}.plugin" in own, f"problems/{name} has no plugin.py"


def test_loaders_import_no_train():
  """Reading untrusted files needs no engine (`loaders.errors` holds their error types)."""
  assert not offending(modules_under("fdistill_jax.loaders"), ["fdistill_jax.train"])


# The toy-only registry must not load these (Stable Diffusion code and its dependencies).
HEAVY = ["fdistill_jax.problems.t2i", "fdistill_jax.models.sd", "fdistill_jax.loaders.diffusers",
         "transformers", "tokenizers", "torch"]
TOY_ONLY = f"""
import json, sys
import fdistill_jax.train.loop
from fdistill_jax import plugins
registry = plugins.registry(["toy"])
assert registry.teachers["toy"] and registry.sources["toy"] and registry.evaluators["toy"]
heavy = {HEAVY!r}
print(json.dumps(sorted(m for m in sys.modules
                        if any(m == h or m.startswith(h + ".") for h in heavy))))
"""


def test_a_toy_only_registry_loads_no_stable_diffusion():
  """The engine's loop plus a registry of the toy alone import no module of problems.t2i,
  models.sd or loaders.diffusers, and neither transformers, tokenizers nor torch."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_ENABLE_ONEDNN_OPTS": "0",
         "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-c", TOY_ONLY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-3000:]


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


@pytest.mark.slow      # one fresh interpreter per module (about 100)
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
  """The loop, main and the generic evaluation never say 'toy' in their code (the imports
  are `test_the_engine_imports_no_problem`)."""
  files = [p for entry in ENGINE for p in ((REPO / entry).rglob("*.py") if (REPO / entry).is_dir()
                                           else [REPO / entry])]
  assert len(files) >= 8
  for path in files:
    said = [line for line in _code_lines(path) if "toy" in line.lower()]
    assert not said, (path, said)


def test_merging_registries_refuses_a_duplicate_key():
  from fdistill_jax.train import registry  # pylint: disable=g-import-not-at-top
  a = registry.Registry(sources={"toy": len}, checks=(len,))
  b = registry.Registry(sources={"digits": len}, evaluators={"toy": len})
  merged = registry.merge(a, b)
  assert sorted(merged.sources) == ["digits", "toy"] and merged.evaluators == {"toy": len}
  assert merged.checks == (len,)
  with pytest.raises(ValueError, match=r"both define sources \['toy'\]"):
    registry.merge(a, registry.Registry(sources={"toy": abs}))


def test_the_default_registry_has_every_kind_the_old_registries_had():
  """The keys of TEACHERS, STUDENTS, SOURCES, EVALUATORS and TABLES before the plugins."""
  from fdistill_jax import plugins  # pylint: disable=g-import-not-at-top
  r = plugins.default_registry()
  assert sorted(r.teachers) == ["edm", "init", "random", "sd15", "sd15_random", "sdxl",
                                "sdxl_random", "toy"]
  assert sorted(r.students) == ["edm", "sd15", "sdxl", "toy"]
  assert sorted(r.sources) == ["captions", "digits", "edm", "memory", "tfds", "toy",
                               "webdataset"]
  assert sorted(r.evaluators) == ["digits", "fid", "grid", "t2i", "t2i_grid", "toy"]
  assert sorted(r.tables) == ["digits", "toy"]
  with pytest.raises(ValueError, match="Unknown problem 'nope'"):
    plugins.registry(["nope"])


MESH_HOMES = {"fdistill_jax/pipelines/sharded.py", "fdistill_jax/train/runner.py"}


def test_meshes_are_built_in_two_places():
  """Data-parallel batches outside training go through `pipelines.sharded.ShardedFn`;
  training builds its 2-D mesh in `train.runner.make_mesh`. No other module calls Mesh()."""
  found = set()
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "Mesh" or
                                         getattr(node.func, "id", None) == "Mesh"):
        found.add(str(path.relative_to(REPO)))
  assert found == MESH_HOMES, sorted(found ^ MESH_HOMES)


def misplaced_slow_marks(source):
  """Names of the classes and non-test functions of a test module's source that carry
  `pytest.mark.slow`: there the mark selects nothing (pytest collects neither), so the test
  meant to be slow silently runs in the default tier."""
  def is_slow(decorator):
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(node, ast.Attribute) and node.attr == "slow"
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(
        is_slow(d) for d in node.decorator_list):
      collected = (node.name.startswith("Test") if isinstance(node, ast.ClassDef)
                   else node.name.startswith("test_"))
      if not collected:
        found.append(node.name)
  return found


def test_the_slow_mark_decorates_only_tests():
  """Every `@pytest.mark.slow` in tests/ sits on a test function or Test class."""
  assert misplaced_slow_marks("import pytest\n@pytest.mark.slow\nclass _Helper:\n  pass\n"
                              "@pytest.mark.slow\ndef test_a():\n  pass\n") == ["_Helper"]
  found = {path.name: misplaced_slow_marks(path.read_text())
           for path in (REPO / "tests").glob("*.py")}
  assert not {k: v for k, v in found.items() if v}, found
