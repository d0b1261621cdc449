"""Atomic file and directory writes: an output appears complete or not at all.

Everything the project writes for a user (converted teachers, exported
generators, sample files, figures, JSON records) goes through these helpers:
the content is written next to the target under a temporary name, then
renamed onto it (`os.replace` is atomic on POSIX file systems). A failure
leaves the target as it was and removes the temporary.

A directory written here carries a marker file (`MARKER`) naming the tool that
wrote it; `replace_dir(..., overwrite=True)` only ever replaces a directory
that holds such a marker, never a user's folder.
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


def write_file(path: str, write: Callable[[str], Any]) -> str:
  """Calls `write(tmp_path)`, then renames the temporary onto `path`.

  Returns:
    The absolute path written.
  """
  path = os.path.abspath(path)
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


def check_output_dir(path: str, overwrite: bool, what: str = "output") -> None:
  """Refuses a target that is a file, or a non-empty directory not ours to replace."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(f"{what} {path} exists and is not a directory; choose another path.")
  if not os.path.isdir(path) or not os.listdir(path):
    return
  if not overwrite:
    raise OutputError(f"{what} directory {path} exists and is not empty: choose another "
                      "path or pass --overwrite.")
  if not is_tool_output(path):
    raise OutputError(f"{what} directory {path} was not written by fdistill_jax (no {MARKER} "
                      "marker): --overwrite only replaces this tool's own outputs. Remove it "
                      "yourself or choose another path.")


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
    with open(os.path.join(tmp, MARKER), "w") as f:
      f.write(f"written by {tool}\n")
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
