"""Atomic file and directory writes: an output appears complete or not at all.

Everything the project writes for a user (converted teachers, exported
generators, sample files, figures, JSON records) goes through these helpers:
the content is written next to the target under a temporary name, then
renamed onto it (`os.replace` is atomic on POSIX file systems). A failure
leaves the target as it was and removes the temporary.

A directory written here carries a marker file (`MARKER`) naming the tool that
wrote it and every file it wrote (recursively) with its SHA-256;
`write_dir(..., overwrite=True)` only ever replaces a directory whose marker
lists every file below it, unchanged (a file a user put inside or edited, e.g.
the input itself, or a marker that is missing or unreadable, makes it refuse),
never a user's folder.
`check_not_inside` refuses an output that would contain an input.
"""

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Optional

from fdistill_jax.io import limits

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


def check_output_file(path: str, *, overwrite: bool = False, inputs=(),
                      protected: Optional[Callable[[str], bool]] = None,
                      what: str = "--out") -> None:
  """Refuses an output file that would replace what the user did not ask to replace.

  Checked before any work: never an input (the same file, or a file inside an
  input directory such as the run's workdir), never a file inside a directory
  for which `protected(directory)` holds (this project's outputs by default;
  tools add run workdirs), and an existing file only with `overwrite`.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise OutputError(f"{what}={path} is a directory; give a file name.")
  check_parent(path, what)
  if not os.path.lexists(path):
    return
  for item in inputs:
    if item and os.path.exists(item) and (os.path.samefile(path, item) or (
        os.path.isdir(item) and _inside(path, item))):
      raise OutputError(f"{what}={path} is (or lies inside) the input {item}: writing there "
                        "would replace it; choose another path.")
  parent = os.path.dirname(path)
  while True:
    if is_tool_output(parent) or (protected is not None and protected(parent)):
      raise OutputError(f"{what}={path} is a file of the run or output directory {parent}: "
                        "writing there would replace it; choose another path.")
    if os.path.dirname(parent) == parent:
      break
    parent = os.path.dirname(parent)
  if not overwrite:
    raise OutputError(f"{what}={path} exists: choose another path, or pass --overwrite to "
                      "replace it.")


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


def _sha256(file: str) -> str:
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    for block in iter(lambda: f.read(2**20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(path: str) -> dict:
  """{relative path: absolute path} of every file below `path` (links count as files)."""
  out = {}
  for root, dirs, names in os.walk(path):
    for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path).replace(os.sep, "/")] = full
  return out


def manifest(path: str) -> dict:
  """{relative path: SHA-256} of every file below `path` except `MARKER` (recursive)."""
  return {rel: _sha256(full) for rel, full in sorted(_files(path).items())
          if rel != MARKER and not os.path.islink(full)}


def _recorded_files(path: str, what: str) -> dict:
  """The {file: sha256} manifest of a marked directory; refuses one it cannot trust."""
  marker = os.path.join(path, MARKER)
  try:
    with open(marker, encoding="utf-8") as f:
      record = limits.json_loads(f.read(2**24), what=marker)
    files = record["files"]
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in files.items())):
      raise TypeError("'files' is not a {path: sha256} object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise OutputError(
        f"{what} directory {path}: its marker {MARKER} is unreadable or lists no files with "
        f"their hashes ({str(e)[:100] or type(e).__name__}; an older version or not ours): "
        "--overwrite deletes only files it can prove this tool wrote. Remove the directory "
        "yourself or choose another path.") from None
  return files


def _foreign_entries(path: str, what: str) -> list:
  """Files below a marked directory that its manifest does not list with their content."""
  recorded = _recorded_files(path, what)
  foreign = []
  for rel, full in sorted(_files(path).items()):
    if rel == MARKER:
      continue
    if os.path.islink(full) or rel not in recorded or _sha256(full) != recorded[rel]:
      foreign.append(rel)
  return foreign


def check_output_dir(path: str, overwrite: bool, what: str = "output") -> None:
  """Refuses a target that is a file, or a non-empty directory not ours to replace.

  `overwrite` replaces only a directory whose marker lists every file below it
  (recursively) with its SHA-256, each file unchanged: a file a user added or
  edited, or a marker that cannot be read, makes it refuse.
  """
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
  foreign = _foreign_entries(path, what)
  if foreign:
    raise OutputError(f"{what} directory {path} holds files this tool did not write or that "
                      f"changed since ({', '.join(foreign[:5])}): --overwrite would delete "
                      "them. Move them out or choose another path.")


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
      json.dump({"tool": tool, "files": manifest(tmp)}, f)
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
