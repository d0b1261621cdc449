"""docs/config.md lists every config field with its true default, and nothing else.

The documented set must equal the leaves of `config_lib.base_config()` plus the
fields the files in configs/ add; a base field's documented default must equal
base_config()'s value, a config-specific one the value of the first config
file that defines it. A field added to the code without a line in the docs
(or a stale line) fails here, naming it.
"""

import json
import pathlib
import re

from fdistill_jax import config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "config.md"
ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| `(.*?)` \| (.+) \|$")
FREE_FORM = ("teacher.arch.",)   # a free-form dict (EDMPrecond kwargs), documented as one field


def documented():
  """{field: (default text, meaning)} from the doc's table rows."""
  rows = {}
  for line in DOC.read_text().splitlines():
    m = ROW.match(line)
    if m:
      assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
      rows[m.group(1)] = (m.group(2), m.group(3))
  return rows


def value(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config.to_dict() if hasattr(config, "to_dict") else config


def as_doc(v):
  return json.dumps(list(v) if isinstance(v, tuple) else v)


def config_files():
  return sorted((REPO / "configs").glob("[a-z]*.py"))


def test_every_field_is_documented_with_its_default():
  docs = documented()
  base = config_lib.base_config()
  expected = {name: as_doc(value(base, name))
              for name in config_lib.field_names(base, leaves_only=True)}
  for path in config_files():
    config = config_lib.load_config_file(str(path))
    for name in config_lib.field_names(config, leaves_only=True):
      if name.startswith(FREE_FORM):
        continue
      if name not in expected and config_lib.unknown_field(base, name) is not None:
        expected[name] = as_doc(value(config, name))
  missing = sorted(set(expected) - set(docs))
  stale = sorted(set(docs) - set(expected))
  assert not missing, f"add these fields to docs/config.md: {missing}"
  assert not stale, f"docs/config.md lists fields no config has: {stale}"
  wrong = {k: (docs[k][0], expected[k]) for k in expected if docs[k][0] != expected[k]}
  assert not wrong, f"documented vs actual defaults: {wrong}"
  assert all(len(meaning) > 10 for _, meaning in docs.values())


def test_the_unknown_field_error_points_at_the_doc():
  message = config_lib.unknown_field(config_lib.base_config(), "loss.gan_weigt")
  assert "loss.gan_weight" in message and "docs/config.md" in message
  assert config_lib.unknown_field(config_lib.base_config(), "loss.gan_weight") is None
