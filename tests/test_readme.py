"""The README's commands are real: every `python -m fdistill_jax...` line (code blocks and
inline) parses with that tool's own flags, configs and variants included, and every
figure it shows exists."""

import importlib
import pathlib
import re
import shlex

import pytest

from tests.test_launch import parse_main

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_commands():
  """Shell words of each `python -m fdistill_jax.*` command in the README."""
  text = README.replace("\\\n", " ")
  found = []
  for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S):
    found += [line.strip() for line in block.splitlines()]
  found += [line.strip() for line in text.splitlines() if line.startswith("    python -m")]
  found += [m.replace("\n", " ") for m in re.findall(r"`(python -m fdistill_jax[^`]+)`", text)]
  commands = []
  for line in found:
    line = line.split(" #")[0].split(" && ")[-1]
    if line.startswith("python -m fdistill_jax"):
      commands.append(shlex.split(line))
  return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_real_run_commands():
  modules = {words[2] for words in COMMANDS}
  assert {"fdistill_jax.main", "fdistill_jax.tools.sample", "fdistill_jax.tools.evaluate",
          "fdistill_jax.tools.convert", "fdistill_jax.tools.plot_weights",
          "fdistill_jax.tools.sweep"} <= modules, modules
  urls = ("edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
          "edm/pretrained/edm-imagenet-64x64-cond-adm.pkl", "edm/fid-refs/cifar10-32x32.npz",
          "edm/fid-refs/imagenet-64x64.npz", "metrics/inception-2015-12-05.pkl")
  for url in urls:
    assert url in README, url


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w)[:80])
def test_readme_command_parses(words):
  module, args = words[2], words[3:]
  if module == "fdistill_jax.main":
    parse_main(args)                  # config file, variant and every --config.FIELD exist
    return
  tool = importlib.import_module(module)
  tool.FLAGS.unparse_flags()
  try:
    tool.FLAGS([module, *args])        # every flag exists and its value parses
  finally:
    tool.FLAGS.unparse_flags()


def test_readme_figures_exist():
  for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
    assert (REPO / path).is_file(), path
