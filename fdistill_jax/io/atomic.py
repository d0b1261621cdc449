"""Atomic file and directory writes: an output appears complete or not at all.

Everything the project writes for a user (converted teachers, exported
generators, sample files, figures, JSON records) goes through these helpers:
the content is written next to the target under a temporary name, then
renamed onto it (`os.replace` is atomic on POSIX file systems). A failure
leaves the target as it was and removes the temporary.

A directory written here carries a marker file (`MARKER`) naming the tool that
wrote it and the entries it wrote; `write_dir(..., overwrite=True)` only ever
replaces a directory that holds such a marker and nothing else (a file a user
put inside, e.g. the input itself, makes it refuse), never a user's folder.
`check_not_inside` refuses an output that would contain an input.
"""

import json
import os
import shutil
import uuid
from typing import Any, Callable

MARKER = ".fdistill_output"


class OutputError(ValueError):
  """The requested output location cannot be written safely."""


def _tmp_name(path: str, kind: str) -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.{kind}-{uuid.uuid4().hex[:8]}")


def _inside(path: str, parent: str) -> bool:
  path, parent = os.path.realpath(path), os.path.realpath(parent)
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_not_inside(output: str, inputs, what: str = "the input") -> None:
  """Refuses an output directory that is, or contains, one of `inputs`."""
  for item in inputs:
    if item and os.path.exists(item) and _inside(item, output):
      raise OutputError(f"{what} {item} lies inside the output {output}: writing there would "
                        "replace it; choose an output outside it.")


def check_parent(path: str, what: str = "output") -> None:
  """Refuses a target whose nearest existing ancestor is a file or not writable."""
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise OutputError(f"{what} {path} cannot be created: {ancestor} is a file, not a "
                      "directory; choose another path.")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise OutputError(f"{what} {path} cannot be created: {ancestor} is not writable; choose "
                      "another path.")


def write_file(path: str, write: Callable[[str], Any]) -> str:
  """Calls `write(tmp_path)`, then renames the temporary onto `path`.

  Returns:
    The absolute path written.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise OutputError(f"{path} is a directory; give a file name.")
  check_parent(path, "file")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp_name(path, "tmp")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text(path: str, text: str) -> str:
  """Writes `text` (UTF-8) atomically."""
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return write_file(path, write)


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented JSON atomically; non-finite floats are refused."""
  return write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def write_npz(path: str, **arrays) -> str:
  """np.savez written atomically (no '.npz' is appended to `path`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return write_file(path, write)


def is_tool_output(path: str) -> bool:
  """True when `path` is a directory this project wrote (it holds `MARKER`)."""
  return os.path.isfile(os.path.join(path, MARKER))


def _foreign_entries(path: str) -> list:
  """Entries of a marked directory that its marker does not list (someone else's files)."""
  try:
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
      record = json.loads(f.read(2**20))
    written = set(record["entries"])
  except (OSError, ValueError, KeyError, TypeError):
    written = None            # a marker of an older version: it lists nothing
  if written is None:
    return []
  return sorted(set(os.listdir(path)) - written - {MARKER})


def check_output_dir(path: str, overwrite: bool, what: str = "output") -> None:
  """Refuses a target that is a file, or a non-empty directory not ours to replace."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"{what} {path} exists and is not a directory; choose another path.")
  check_parent(path, what)
  if not os.path.isdir(path) or not os.listdir(path):
    return
  if not overwrite:
    raise OutputError(f"{what} directory {path} exists and is not empty: choose another "
                      "path or pass --overwrite.")
  if not is_tool_output(path):
    raise OutputError(f"{what} directory {path} was not written by fdistill_jax (no {MARKER} "
                      "marker): --overwrite only replaces this tool's own outputs. Remove it "
                      "yourself or choose another path.")
  foreign = _foreign_entries(path)
  if foreign:
    raise OutputError(f"{what} directory {path} holds files this tool did not write "
                      f"({', '.join(foreign[:5])}): --overwrite would delete them. Move them "
                      "out or choose another path.")


def write_dir(path: str, fill: Callable[[str], Any], *, overwrite: bool = False,
              tool: str = "fdistill_jax", what: str = "output") -> str:
  """Builds a directory with `fill(tmp_dir)` and renames it onto `path`.

  The target is checked before and again after `fill` (which may take long).
  An existing target is replaced only with `overwrite` and only when it is a
  directory this project wrote; it is moved aside before the rename and
  deleted after it, so at every moment one complete version exists.

  Returns:
    The absolute path written.
  """
  path = os.path.abspath(path)
  check_output_dir(path, overwrite, what)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp_name(path, "tmp")
  os.makedirs(tmp)
  try:
    fill(tmp)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
      json.dump({"tool": tool, "entries": sorted(os.listdir(tmp))}, f)
    check_output_dir(path, overwrite, what)
    _swap_in(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return path


def _swap_in(src: str, dst: str) -> None:
  old = None
  if os.path.isdir(dst) and os.listdir(dst):
    old = _tmp_name(dst, "old")
    os.rename(dst, old)
  elif os.path.isdir(dst):
    os.rmdir(dst)
  os.rename(src, dst)
  if old is not None:
    shutil.rmtree(old)
