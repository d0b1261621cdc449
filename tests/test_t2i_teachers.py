"""The 'tiny' text-to-image variants (random networks) refuse a teacher.path in one line that
says how to use one's own folder, instead of ignoring it."""

import pathlib

import ml_collections
import pytest

from fdistill_jax import config_lib
from fdistill_jax import plugins

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, kind", [("sd15", "sd15"), ("sdxl", "sdxl")])
def test_tiny_variant_refuses_a_teacher_path(name, kind):
  config = config_lib.load_config_file(f"{REPO}/configs/{name}.py:js,tiny")
  config_lib.set_field(config, "teacher.path", "/models/my-own-folder")
  with pytest.raises(ValueError) as e:
    plugins.registry(["t2i"]).teacher(ml_collections.FrozenConfigDict(config))
  message = str(e.value)
  assert len(message.splitlines()) == 1, message
  assert "/models/my-own-folder" in message and f"--config.teacher.kind={kind}" in message
