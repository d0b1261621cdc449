"""The commands in the configs' docstrings are real: they parse with main's flags into a
valid config, and configs/tiny.py's runs from the command line (its data included)."""

import ast
import pathlib
import shlex
import subprocess
import sys

import pytest

from fdistill_jax import config_lib
from fdistill_jax.data import registry as data_registry
from tests.helpers import parse_main

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("[a-z]*.py"))


def docstring_commands(path):
  """The shell commands (backslash continuations joined) in a module's docstring."""
  doc = ast.get_docstring(ast.parse(path.read_text()))
  text = doc.replace("\\\n", " ")
  return [shlex.split(line.strip()) for line in text.splitlines()
          if line.strip().startswith("python ")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_docstring_commands_parse_into_valid_configs(path):
  commands = [c for c in docstring_commands(path) if c[:3] == ["python", "-m", "fdistill_jax.main"]]
  assert commands, f"{path.name} shows no `python -m fdistill_jax.main` command"
  for words in commands:
    config, other = parse_main(words[3:])
    assert other["workdir"]
    assert config.data.kind != "memory", (   # only Python can pass in-memory arrays
        f"{path.name}: its command uses data.kind=memory, which a command line cannot give")
    config_lib.validate(config, num_devices=8)


def test_tiny_command_line_data_source(tmp_path):
  """configs/tiny.py's two commands: the first writes the dataset the second reads."""
  commands = docstring_commands(REPO / "configs" / "tiny.py")
  write, train = commands
  assert write[:3] == ["python", "-m", "configs.tiny"]
  data_dir = tmp_path / "tiny_data"
  out = subprocess.run([sys.executable, *write[1:-1], str(data_dir)], cwd=REPO,
                       capture_output=True, text=True, check=False, timeout=120)
  assert out.returncode == 0, out.stderr
  argv = [a.replace(write[-1], str(data_dir)) for a in train[3:]]
  config, _ = parse_main(argv)
  assert config.data.kind == "edm" and config.data.path == str(data_dir)
  source = data_registry.make_source(config.data)
  batch = source.batch(0, global_batch_size=config.batch_size)
  assert batch["images"].shape == (config.batch_size, 8, 8, 3)
  assert source.num_classes == config.teacher.arch.label_dim == 4
