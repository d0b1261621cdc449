"""Resource bounds for reading untrusted files: nothing a file says is believed before it is checked.

Every reader of a file a user downloaded (teacher snapshots and state dicts,
Inception weights, reference statistics, sample and dataset files) goes through
these helpers, so that a small hostile file cannot make the process allocate
much more than its own size, walk an exponential object graph or recurse
without bound:

* `Budget`: a byte allowance for the arrays a reader creates, by default
  `BUDGET_FACTOR` x the input size + `BUDGET_SLACK`; each allocation is charged
  before it is made.
* `BoundedReader`: a file wrapper whose `read(n)` never asks for more than the
  bytes left, so a length field claiming 2**60 bytes allocates nothing.
* `read_zip_member`: a zip member's declared size charged to a budget before
  reading, at most that many bytes produced (inflated in 1 MiB pieces), and only
  stored / deflate members (`check_zip_member`: bzip2, lzma, unknown methods and
  encrypted members are refused): a zip bomb costs no more than it declares.
* `load_npz`: `.npz` members read after checking each `.npy` header (plain
  numeric dtype, shape x itemsize equal to the member's declared size).
* `check_graph`: an unpickled object graph must be acyclic, at most
  `MAX_DEPTH` deep and expand to at most `MAX_EXPANDED` nodes when shared
  references are followed (the "billion laughs" list is a small file).
* `json_loads` / `json_load`: JSON parsed with a size and nesting limit, every
  error a `ValueError` naming the file (never a RecursionError).
* `short_repr`: bounded `repr` for error messages about hostile values.
"""

import io
import json
import math
import os
import reprlib
import zipfile
import zlib
from typing import Any, Callable, Iterable, Optional

import numpy as np

BUDGET_FACTOR = 2            # arrays made from a file: at most 2x its size ...
BUDGET_SLACK = 16 * 2**20    # ... plus 16 MiB
MAX_DEPTH = 100              # nesting of containers in an unpickled object
MAX_JSON_BYTES = 64 * 2**20  # a JSON file a user gives (configs, tokenizers, specs)
MAX_JSON_DEPTH = 64          # nesting of a JSON document
MAX_EXPANDED = 2_000_000     # nodes of an unpickled object with shared references expanded
PLAIN_KINDS = "biufc"        # bool, signed / unsigned int, float, complex

class _ShortRepr(reprlib.Repr):
  """reprlib that never converts a huge int to decimal (quadratic; refused past 4300 digits)."""

  def repr_int(self, x, level):
    return f"<int of {x.bit_length()} bits>" if x.bit_length() > 64 else repr(x)


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


class ResourceLimitError(ValueError):
  """A file asks for more memory, depth or work than its size justifies."""


def short_repr(value: Any) -> str:
  """`repr` cut to a few levels and ~60 characters per item (safe on hostile values)."""
  return _REPR.repr(value)


class Budget:
  """Bytes a reader may still allocate for one input; `charge` refuses an overdraft.

  Args:
    limit: the allowance in bytes.
    what: the input, named in the error message.
  """

  def __init__(self, limit: int, what: str = "the file"):
    self.limit, self.used, self.what = int(limit), 0, what

  @classmethod
  def for_size(cls, nbytes: int, what: str = "the file") -> "Budget":
    return cls(BUDGET_FACTOR * int(nbytes) + BUDGET_SLACK, what)

  def charge(self, nbytes: int, item: str = "an array") -> None:
    nbytes = int(nbytes)
    if nbytes < 0 or self.used + nbytes > self.limit:
      raise ResourceLimitError(
          f"{item} would need {nbytes:,} bytes, more than {self.what} can justify "
          f"({self.used:,} of {self.limit:,} bytes already used: at most "
          f"{BUDGET_FACTOR}x its size + {BUDGET_SLACK // 2**20} MiB): the file is corrupt or "
          "hostile.")
    self.used += nbytes


MAX_DIM = 2**62               # any size, stride or count a file gives: a machine integer


def is_dim(value: Any) -> bool:
  """A plain int in [0, MAX_DIM] (cheap whatever its size: no arithmetic on it)."""
  return type(value) is int and 0 <= value <= MAX_DIM  # pylint: disable=unidiomatic-typecheck


def spec_int(spec: Any, key: str, low: int, high: int, what: str) -> int:
  """spec[key], checked to be a plain int in [low, high] (a generator spec, an arch.json):
  otherwise one ValueError naming the file and the field."""
  value = spec.get(key) if isinstance(spec, dict) else None
  if type(value) is not int or not low <= value <= high:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f"{what}: {key!r} is {short_repr(value)}; expected an integer in "
                     f"[{low}, {high}]. The file is corrupt or not written by this project.")
  return value


def spec_floats(spec: Any, key: str, max_len: int, what: str, *, positive=True) -> tuple:
  """spec[key], checked to be a list of 1..max_len finite (positive) numbers."""
  value = spec.get(key) if isinstance(spec, dict) else None
  ok = (isinstance(value, list) and 0 < len(value) <= max_len
        and all(type(v) in (int, float) and math.isfinite(v) and (v > 0 or not positive)
                for v in value))
  if not ok:
    raise ValueError(f"{what}: {key!r} is {short_repr(value)}; expected a list of 1 to "
                     f"{max_len} finite{' positive' if positive else ''} numbers. The file is "
                     "corrupt or not written by this project.")
  return tuple(float(v) for v in value)


def nbytes_of(shape: Iterable[int], itemsize: int) -> int:
  """Exact byte size of an array; a factor outside [0, MAX_DIM] or a product past
  MAX_DIM is refused before it is multiplied (no big-integer arithmetic on file values)."""
  shape = tuple(shape)
  if not all(is_dim(n) for n in shape) or not is_dim(itemsize):
    raise ResourceLimitError(f"array shape {short_repr(shape)}: every size must be an int in "
                             f"[0, 2**62]: the file is corrupt or hostile.")
  if 0 in shape:
    return 0
  total = itemsize
  for n in shape:
    total *= n
    if total > MAX_DIM:
      raise ResourceLimitError(f"array shape {short_repr(shape)} holds more than 2**62 bytes: "
                               "the file is corrupt or hostile.")
  return total


class BoundedReader:
  """Read-only view of a binary file that never reads past its known size."""

  def __init__(self, file, size: Optional[int] = None):
    self._file = file
    start = file.tell()
    if size is None:
      file.seek(0, os.SEEK_END)
      size = file.tell()
      file.seek(start)
    self.size, self._end = size - start, size

  def _left(self) -> int:
    return max(0, self._end - self._file.tell())

  def read(self, n: int = -1) -> bytes:
    n = self._left() if n is None or n < 0 else min(int(n), self._left())
    return self._file.read(n)

  def readline(self, limit: int = -1) -> bytes:
    left = self._left()
    return self._file.readline(left if limit is None or limit < 0 else min(limit, left))

  def readinto(self, buffer) -> int:
    view = memoryview(buffer).cast("B")
    data = self.read(len(view))
    view[:len(data)] = data
    return len(data)

  def tell(self) -> int:
    return self._file.tell()

  def seek(self, offset: int, whence: int = 0) -> int:
    return self._file.seek(offset, whence)


def bounded(file) -> BoundedReader:
  """Wraps a file object (or bytes) in a `BoundedReader`."""
  if isinstance(file, (bytes, bytearray, memoryview)):
    file = io.BytesIO(bytes(file))
  return file if isinstance(file, BoundedReader) else BoundedReader(file)


# Zip members: only the methods the formats we read use (np.savez / torch.save
# write "stored", np.savez_compressed and dataset zips "deflate"). zipfile
# inflates bzip2 and lzma members in one call, whatever size they declared.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
ZIP_CHUNK = 2**20             # bytes asked of the decompressor per read


def check_zip_member(info: zipfile.ZipInfo, where: str) -> zipfile.ZipInfo:
  """Refuses encrypted members and compression methods other than stored / deflate."""
  if info.flag_bits & 0x1:
    raise ResourceLimitError(f"{where}: the zip member is encrypted; only plain members are "
                             "read.")
  if info.compress_type not in ZIP_METHODS:
    raise ResourceLimitError(
        f"{where}: zip compression method {info.compress_type} refused; only stored (0) and "
        "deflate (8) members are read (re-save the file with numpy / torch).")
  return info


def zip_member_info(archive: zipfile.ZipFile, name: str, where: str = "") -> zipfile.ZipInfo:
  """The checked `ZipInfo` of `name` (`check_zip_member`)."""
  where = where or f"zip member {name!r}"
  try:
    info = archive.getinfo(name)
  except KeyError as e:
    raise ResourceLimitError(f"zip member {name!r} is missing.") from e
  return check_zip_member(info, where)


def zip_member_size(archive: zipfile.ZipFile, name: str, budget: Budget) -> int:
  """Declared uncompressed size of `name`, charged to `budget` before any inflating."""
  info = zip_member_info(archive, name)
  budget.charge(info.file_size, f"zip member {name!r} (compressed {info.compress_size:,} bytes)")
  return info.file_size


def read_zip_member(archive: zipfile.ZipFile, name: str, budget: Budget) -> bytes:
  """The bytes of a zip member: its declared size charged first, at most that many produced.

  The member is inflated in `ZIP_CHUNK` pieces and never past its declared
  size, so a member that understates its size costs no more than it declared
  (zipfile's own `read()` inflates up to 2 GiB per call).
  """
  size = zip_member_size(archive, name, budget)
  out = bytearray()
  try:
    with archive.open(name) as member:
      while len(out) < size:
        chunk = member.read(min(ZIP_CHUNK, size - len(out)))
        if not chunk:
          break
        out += chunk
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
          RuntimeError) as e:
    raise ResourceLimitError(f"zip member {name!r} is corrupt ({type(e).__name__}: "
                             f"{str(e)[:200]}).") from None
  if len(out) != size:
    raise ResourceLimitError(f"zip member {name!r} holds {len(out):,} of its declared {size:,} "
                             "bytes: the file is truncated.")
  return bytes(out)


def check_plain_dtype(dtype: np.dtype, where: str) -> np.dtype:
  """Only plain numeric / bool dtypes: no fields, subarrays, objects, strings or voids."""
  dtype = np.dtype(dtype)
  if (dtype.kind not in PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None
      or dtype.hasobject):
    raise ResourceLimitError(f"{where}: dtype {dtype.str!r} refused; only plain numeric and "
                             "bool dtypes are read.")
  return dtype


def _npy_header(member, where: str):
  """(shape, dtype, fortran_order) of an .npy stream, after its magic and header."""
  try:
    version = np.lib.format.read_magic(member)
    reader = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
      raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = reader(member, max_header_size=10000)
  except (ValueError, SyntaxError, TypeError, EOFError) as e:
    raise ResourceLimitError(f"{where}: not a valid .npy header ({e}).") from e
  return shape, check_plain_dtype(dtype, where), fortran


def _read_member(archive, info, where, budget):
  check_zip_member(info, where)
  with archive.open(info) as member:
    shape, dtype, fortran = _npy_header(member, where)
    header_len = member.tell()
    nbytes = nbytes_of(shape, dtype.itemsize)
    if nbytes != info.file_size - header_len:
      raise ResourceLimitError(
          f"{where}: the header declares shape {shape} of {dtype.str} ({nbytes:,} bytes) but "
          f"the member holds {info.file_size - header_len:,}: the file is corrupt or hostile.")
    budget.charge(nbytes, where)
    data = member.read(nbytes)
  if len(data) != nbytes:
    raise ResourceLimitError(f"{where}: array data is truncated.")
  array = np.frombuffer(data, dtype)
  return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def load_npz(path, keys: Optional[Iterable[str]] = None,
             budget: Optional[Budget] = None) -> dict:
  """{name: array} of an `.npz` (or `.npy`) file, every header checked before allocating.

  Args:
    path: the file.
    keys: read only these members (default: all); missing ones are simply absent.
    budget: allowance for the arrays (default: `Budget.for_size(file size)`).

  Raises:
    ResourceLimitError: a header lies about its size or names a non-numeric dtype.
    ValueError: the file is not an npz archive.
  """
  size = os.path.getsize(path)
  budget = budget or Budget.for_size(size, str(path))
  if str(path).endswith(".npy"):
    with open(path, "rb") as f:
      shape, dtype, fortran = _npy_header(f, str(path))
      nbytes = nbytes_of(shape, dtype.itemsize)
      if nbytes != size - f.tell():
        raise ResourceLimitError(f"{path}: header declares {nbytes:,} bytes of data, the file "
                                 f"holds {size - f.tell():,}.")
      return {"arr_0": np.fromfile(f, dtype, count=int(np.prod(shape))).reshape(
          shape, order="F" if fortran else "C")}
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e}).") from e
  wanted = None if keys is None else set(keys)
  out = {}
  with archive:
    for info in archive.infolist():
      name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
      if wanted is None or name in wanted:
        out[name] = _read_member(archive, info, f"{path}[{name}]", budget)
  return out


def npz_keys(path) -> list:
  """Member names of an `.npz` file without reading any array."""
  try:
    with zipfile.ZipFile(path) as archive:
      return [n[:-4] if n.endswith(".npy") else n for n in archive.namelist()]
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e}).") from e


# --------------------------------------------------------------------------
# Object graphs from a pickle.


def check_graph(root: Any, children: Callable[[Any], Optional[list]], *,
                max_depth: int = MAX_DEPTH, max_expanded: int = MAX_EXPANDED,
                what: str = "the pickle") -> int:
  """Refuses cycles, nesting deeper than `max_depth`, and graphs that expand too far.

  `children(obj)` lists the objects a container holds (None for a leaf). The
  expanded size counts every path: a list of ten references to a list of ten
  references ... is small on disk but huge for any code that walks it.
  Iterative, with one visit per distinct object (cost: the objects, not the paths).

  Returns:
    The expanded size.
  """
  sizes, on_path = {}, set()
  stack = [(root, 0, False)]
  while stack:
    obj, depth, done = stack.pop()
    key = id(obj)
    kids = children(obj)
    if done:
      on_path.discard(key)
      sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in kids)
      if sizes[key] > max_expanded:
        raise ResourceLimitError(
            f"{what} holds an object that expands to more than {max_expanded:,} nodes through "
            "shared references (a 'billion laughs' structure): refused.")
      continue
    if kids is None or key in sizes:
      continue
    if key in on_path:
      raise ResourceLimitError(f"{what} holds a container that contains itself (a cycle): "
                               "refused.")
    if depth >= max_depth:
      raise ResourceLimitError(f"{what} nests containers more than {max_depth} deep: refused.")
    on_path.add(key)
    stack.append((obj, depth, True))
    stack.extend((c, depth + 1, False) for c in kids)
  return sizes.get(id(root), 1)


# --------------------------------------------------------------------------
# JSON from a file.


def _json_depth(obj: Any, max_depth: int, what: str) -> None:
  stack = [(obj, 1)]
  while stack:
    value, depth = stack.pop()
    if isinstance(value, (dict, list)):
      if depth > max_depth:
        raise ValueError(f"{what} is not valid JSON (nested more than {max_depth} deep: the "
                         "file is corrupt or hostile).")
      items = value.values() if isinstance(value, dict) else value
      stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))


def json_loads(text, what: str = "the JSON file", *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
  """`json.loads` of a file's text (str or bytes) with a size and nesting limit.

  Raises:
    ValueError: naming `what`: too large, not UTF-8, not JSON, nested too deep
      (the parser's RecursionError included), or holding NaN / Infinity.
  """
  if len(text) > max_bytes:
    raise ValueError(f"{what}: {len(text):,} bytes of JSON, more than the {max_bytes:,} "
                     "accepted: the file is corrupt or not of this format.")
  if isinstance(text, (bytes, bytearray)):
    try:
      text = bytes(text).decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}).") from None

  def no_constants(name):
    raise ValueError(f"{name} is not a JSON number")

  try:
    obj = json.loads(text, parse_constant=no_constants)
  except RecursionError:
    raise ValueError(f"{what} is not valid JSON (nested more than {max_depth} deep: the file "
                     "is corrupt or hostile).") from None
  except ValueError as e:
    raise ValueError(f"{what} is not valid JSON ({str(e)[:200]}).") from None
  _json_depth(obj, max_depth, what)
  return obj


def json_load(path, what: str = "", **kwargs) -> Any:
  """`json_loads` of a file, read no further than the size limit."""
  limit = kwargs.get("max_bytes", MAX_JSON_BYTES)
  with open(path, "rb") as f:
    data = f.read(limit + 1)
  return json_loads(data, what or str(path), **kwargs)
