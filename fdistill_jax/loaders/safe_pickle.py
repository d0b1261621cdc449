"""Restricted unpickling of PyTorch and EDM files: without torch, without exec, with bounds.

`pickle.load` runs whatever callables a file names, and EDM snapshots
(NVlabs/edm `torch_utils/persistence.py`) even carry Python source that the
reference loader `exec`s. This module reads such files with an allow-list:
`find_class` resolves only the globals below, each to a stand-in written here,
and refuses every other global with `ForbiddenGlobalError` naming it. It is
the project's only unpickler: EDM snapshots, torch.save state dicts,
TorchScript archives (FID Inception weights) and `.bin` model files all go
through `RestrictedUnpickler`.

The allow-list, and why each entry is safe (what its arguments can make it do):

| global(s) | stand-in | why it is safe |
|---|---|---|
| collections.OrderedDict | `_ordered_dict` | no arguments, or a list/tuple of pairs (no expansion of arrays) |
| builtins.set / frozenset | `_set`, `_frozenset` | a list/tuple only (hashing is bounded by the graph checks) |
| builtins.slice / complex | the builtins | numbers and short strings in, a scalar out |
| _codecs.encode | `_safe_codecs_encode` | str -> bytes, latin1/utf-8 only, output ~ input size |
| numpy.dtype | `_np_dtype` | plain numeric/bool codes only (`_DTYPE_CODE`), always a fresh copy; its BUILD state must be the plain-dtype state (byte order only): no fields, offsets, subarrays or object flags |
| numpy.ndarray | `_NdarrayName` | a name, never instantiated (NEWOBJ refuses) |
| numpy.*._reconstruct | `_np_reconstruct` | only `(ndarray, (0,), b'b')` as numpy writes; the BUILD state is checked: plain dtype, data exactly shape x itemsize bytes of the file |
| numpy.*.scalar | `_np_scalar` | plain dtype, exactly itemsize bytes |
| numpy.*._frombuffer | `_np_frombuffer` | plain dtype, buffer exactly shape x itemsize, charged to the budget |
| torch._utils._rebuild_tensor, _rebuild_tensor_v2 | `_rebuild_tensor` | a view inside its storage, no larger than it (no stride-0 blow-up), copy charged to the budget |
| torch._utils._rebuild_parameter, _rebuild_parameter_with_state | `_rebuild_parameter` | returns its array |
| torch._tensor._rebuild_from_type_v2 | `_rebuild_from_type_v2` | calls only the two tensor stand-ins above |
| torch.storage._load_from_bytes | `_load_storage_bytes` | a nested torch.save archive read by this module (one level only), same budget |
| torch.Size / torch.device | `_torch_size`, `_torch_device` | ints -> tuple; str/int -> str (no `str()` of containers) |
| torch.*Storage, torch.<dtype> | `StorageType`, dtype codes | frozen data, not callable |
| torch.nn Module, ModuleDict, ModuleList, Sequential | `ModuleRecord` subclasses | keep their arguments and dict state, nothing else |
| torch_utils.persistence._reconstruct_persistent_obj | `_reconstruct_persistent_obj` | records class name and state; `module_src` is never read |
| dnnlib(.util).EasyDict | `EasyDict` | a dict built from a mapping or pairs |
| torch.jit._pickle.* (torchscript=True) | `_jit_list`, `_restore_type_tag` | list/tuple -> list; returns its value |
| `__torch__.*` classes (torchscript=True) | `ScriptObject` subclasses | keep their state, at most `MAX_SCRIPT_TYPES` names |

Beyond the allow-list, `RestrictedUnpickler` (the pure-Python pickle machine
of `fdistill_jax.loaders.unpickler`, so that every opcode can be checked) refuses BUILD (`__setstate__`) on
anything but the records above, validated arrays and dtypes, and dicts; it
stops after `MAX_OPCODES` opcodes, never reads past the end of the input nor
allocates a length field before the bytes are there (BYTEARRAY8), and
checks the loaded object graph with `limits.check_graph` (no cycles, bounded
depth and expanded size). Arrays are charged to a `limits.Budget` of about
twice the input size. Any malformed input ends in `pickle.UnpicklingError`
(never a crash, a hang or a raw RecursionError / MemoryError).

Typical use:

  obj = safe_load(open("network-snapshot.pkl", "rb"))
  weights = module_state_dict(obj["ema"])       # {"model.enc...weight": ndarray}
  sd = load_torch("pt_inception.pth")            # torch.save archive -> numpy
  sd = load_torch_zip(data, torchscript=True)    # TorchScript archive: module state
"""

import dataclasses
import functools
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Mapping, Optional, Union

import numpy as np

from fdistill_jax.io import limits
from fdistill_jax.loaders import unpickler
# The records and errors of the pickle machine, under this module's name too.
from fdistill_jax.loaders.unpickler import MAX_OPCODES
from fdistill_jax.loaders.unpickler import EasyDict
from fdistill_jax.loaders.unpickler import ForbiddenGlobalError
from fdistill_jax.loaders.unpickler import ModuleRecord
from fdistill_jax.loaders.unpickler import PersistentObject
from fdistill_jax.loaders.unpickler import ScriptObject
from fdistill_jax.loaders.unpickler import UnsafePickleError
from fdistill_jax.loaders.unpickler import record_class

PathOrBytes = Union[str, os.PathLike, bytes]
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # first pickle of a legacy torch.save file
_ZIP_MAGIC = b"PK\x03\x04"
MAX_NESTED_ARCHIVES = 1        # torch.save archives inside a pickled storage


class TorchFormatError(pickle.UnpicklingError):
  """A torch.save archive or tensor record is malformed or truncated."""


# --------------------------------------------------------------------------
# Storages and tensors.


@dataclasses.dataclass(frozen=True)
class StorageType:
  """A torch storage class name (e.g. torch.FloatStorage) and its dtype."""
  name: str
  dtype: str


_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "i8", "IntStorage": "i4",
    "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16", "UntypedStorage": "u1",
}
_TORCH_DTYPES = {
    "float32": "f4", "float": "f4", "float64": "f8", "double": "f8",
    "float16": "f2", "half": "f2", "bfloat16": "bfloat16", "int64": "i8",
    "long": "i8", "int32": "i4", "int": "i4", "int16": "i2", "int8": "i1",
    "uint8": "u1", "bool": "?",
}


def _storage_dtype(code: str, byteorder: str = "little") -> np.dtype:
  if code == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")


@dataclasses.dataclass
class _PendingStorage:
  """Placeholder used while locating the storages of a legacy archive."""
  key: str


def _rebuild_tensor(storage, storage_offset, size, stride, *unused, budget):
  """`torch._utils._rebuild_tensor(_v2)`: a strided view inside a storage, copied."""
  if isinstance(storage, _PendingStorage):
    return None
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise TorchFormatError(f"tensor storage must be a 1-D array, got {type(storage).__name__}.")
  size = unpickler.check_shape(tuple(unpickler.check_sequence(size, "tensor size")), "tensor size")
  stride = tuple(unpickler.check_sequence(stride, "tensor stride"))
  offset = storage_offset
  if (not limits.is_dim(offset) or len(size) != len(stride)
      or not all(limits.is_dim(s) for s in stride)):
    raise TorchFormatError(f"bad tensor layout: offset {limits.short_repr(offset)}, size "
                           f"{size}, stride {limits.short_repr(stride)}.")
  try:
    numel = limits.nbytes_of(size, 1)   # sizes bounded before any product
  except limits.ResourceLimitError as e:
    raise UnsafePickleError(f"tensor: {e}") from None
  if numel == 0:
    return np.zeros(size, storage.dtype)
  # Every term is a bounded machine integer (< 2**124): no big-integer arithmetic.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise TorchFormatError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reads past "
        f"its storage of {storage.size} elements: the file is corrupt.")
  if numel > storage.size:
    raise UnsafePickleError(
        f"tensor of size {size} (stride {stride}) has {numel:,} elements but its storage only "
        f"{storage.size:,}: stride-0 expansions are refused (they would allocate far more "
        "than the file holds).")
  budget.charge(numel * storage.itemsize, f"tensor of size {size}")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  """`torch._utils._rebuild_parameter(_with_state)`: the data array itself."""
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """`torch._tensor._rebuild_from_type_v2`: `func` must be a tensor stand-in."""
  del new_type, state
  if getattr(func, "func", func) not in (_rebuild_tensor, _rebuild_parameter):
    raise UnsafePickleError(f"_rebuild_from_type_v2 with {limits.short_repr(func)} refused.")
  return func(*unpickler.check_sequence(args, "_rebuild_from_type_v2 arguments"))


def _load_storage_bytes(data, *, budget, nesting):
  """`torch.storage._load_from_bytes`: a torch.save archive of one storage."""
  if nesting >= MAX_NESTED_ARCHIVES:
    raise UnsafePickleError("a torch archive nested inside a storage of a nested archive is "
                            "refused.")
  if not isinstance(data, (bytes, bytearray)):
    raise TorchFormatError("a pickled torch storage must hold bytes.")
  storage = _load_torch_bytes(bytes(data), None, False, budget, nesting + 1)
  if not isinstance(storage, np.ndarray):
    raise TorchFormatError("a pickled torch storage did not hold a storage.")
  return storage


# --------------------------------------------------------------------------
# The allow-list with tensors, and the unpickler.


def _tensor_globals() -> dict:
  """Allow-list entries of torch tensors that allocate nothing (see the module docstring)."""
  allowed = {("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
             ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
             ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2}
  for name, code in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = StorageType(name, code)
  for name, code in _TORCH_DTYPES.items():
    allowed[("torch", name)] = code
  return allowed


_TENSOR_GLOBALS = _tensor_globals()


class RestrictedUnpickler(unpickler.RestrictedUnpickler):
  """`unpickler.RestrictedUnpickler` with torch tensors and storages (module docstring).

  Takes the base class's arguments (file, extra_allowed, persistent_load,
  torchscript, budget).
  """

  def budgeted_globals(self, budget, nesting) -> dict:
    return _budgeted_globals(budget, nesting)


def _budgeted_globals(budget, nesting) -> dict:
  """Tensor and array entries, bound to one load's budget and archive nesting."""
  tensor = functools.partial(_rebuild_tensor, budget=budget)
  return {**unpickler.numpy_budgeted_globals(budget), **_TENSOR_GLOBALS,
          ("torch._utils", "_rebuild_tensor"): tensor,
          ("torch._utils", "_rebuild_tensor_v2"): tensor,
          ("torch.storage", "_load_from_bytes"):
              functools.partial(_load_storage_bytes, budget=budget, nesting=nesting)}


def allowed_globals() -> dict:
  """The whole allow-list, (module, name) -> stand-in (documentation and tests)."""
  return {**unpickler.BASE_GLOBALS, **unpickler.torchscript_globals(),
          **_budgeted_globals(limits.Budget(0), 0)}


def safe_load(file: BinaryIO, *,
              extra_allowed: Optional[Mapping[tuple, Any]] = None) -> Any:
  """Unpickles `file` with the allow-list; torch tensors become numpy arrays.

  Raises:
    ForbiddenGlobalError: the pickle names a global outside the allow-list.
    pickle.UnpicklingError: the data is malformed, truncated or refused for safety.
  """
  return RestrictedUnpickler(file, extra_allowed=extra_allowed).load()


def safe_loads(data: bytes, **kwargs) -> Any:
  """`safe_load` for bytes."""
  return safe_load(io.BytesIO(data), **kwargs)


# --------------------------------------------------------------------------
# torch.save archives.


def _read_bytes(path_or_bytes: PathOrBytes) -> bytes:
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    return bytes(path_or_bytes)
  with open(path_or_bytes, "rb") as f:
    return f.read()


def _storage_pid(pid) -> tuple:
  """Checks a ('storage', type, key, location, numel[, view]) persistent id."""
  if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
      or not isinstance(pid[1], StorageType) or not isinstance(pid[2], (str, int))
      or not limits.is_dim(pid[4])):
    raise TorchFormatError(f"unsupported persistent id {limits.short_repr(pid)} in a torch "
                           "archive: only tensor storages are supported.")
  return pid[1], str(pid[2]), pid[4], (pid[5] if len(pid) > 5 else None)


def _open_zip(data: bytes, budget: limits.Budget) -> tuple:
  """(archive, '<name>/' prefix, byte order) of a torch zip archive."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
  except zipfile.BadZipFile as e:
    raise TorchFormatError(f"not a readable torch zip archive ({e}): the file "
                           "may be truncated.") from e
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise TorchFormatError(f"torch zip archive must hold one <name>/data.pkl, "
                           f"found {limits.short_repr(pkl or names[:5])}.")
  root = pkl[0][:-len("data.pkl")]
  order = "little"
  if root + "byteorder" in names:
    order = limits.read_zip_member(archive, root + "byteorder", budget)[:16].decode(
        "ascii", "replace").strip()
  return archive, root, order


def _zip_storage(archive, root, order, pid, budget, cache) -> np.ndarray:
  """The storage a zip archive's persistent id names, as a 1-D array (read once)."""
  stype, key, numel, _ = _storage_pid(pid)
  if key in cache:
    return cache[key]
  dtype = _storage_dtype(stype.dtype, order)
  name = f"{root}data/{key}"
  try:
    size = archive.getinfo(name).file_size
  except KeyError as e:
    raise TorchFormatError(f"storage {key} is missing from the archive.") from e
  if size < numel * dtype.itemsize:
    raise TorchFormatError(f"storage {key}: {size} bytes for {numel} elements of {dtype}; "
                           "the file is truncated.")
  raw = limits.read_zip_member(archive, name, budget)
  cache[key] = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="),
                                                             copy=False)
  return cache[key]


def _load_zip(data, extra_allowed, torchscript, budget, nesting):
  archive, root, order = _open_zip(data, budget)
  cache = {}
  pkl = limits.read_zip_member(archive, root + "data.pkl", budget)
  return RestrictedUnpickler(
      io.BytesIO(pkl), extra_allowed=extra_allowed, torchscript=torchscript, budget=budget,
      _nesting=nesting,
      persistent_load=lambda pid: _zip_storage(archive, root, order, pid, budget, cache)).load()


def _legacy_pickle(stream, storages, extra_allowed, budget, nesting):
  """Unpickles one pickle of a legacy archive; collects storage ids seen."""
  seen = {}

  def persistent_load(pid):
    stype, key, numel, view = _storage_pid(pid)
    seen.setdefault(key, (stype, numel))
    if storages is None:
      return _PendingStorage(key)
    array = storages[key]
    if view is not None:  # (view_key, offset, size) from torch < 1.0
      _, offset, size = view
      array = array[int(offset):int(offset) + int(size)]
    return array

  obj = RestrictedUnpickler(stream, extra_allowed=extra_allowed, budget=budget,
                            persistent_load=persistent_load, _nesting=nesting).load()
  return obj, seen


def _legacy_storages(stream, keys, seen, order, budget):
  storages = {}
  for key in unpickler.check_sequence(keys, "storage key list"):
    stype, _ = seen[key]
    dtype = _storage_dtype(stype.dtype, order)
    (numel,) = struct.unpack("<q", stream.read(8))
    left = len(stream.getbuffer()) - stream.tell()
    if numel < 0 or numel > left // dtype.itemsize:   # checked before reading or allocating
      raise TorchFormatError(f"storage {limits.short_repr(key)} claims {numel:,} elements of "
                             f"{dtype.itemsize} bytes, the file holds {left:,} more bytes: it "
                             "is truncated or corrupt.")
    raw = stream.read(numel * dtype.itemsize)
    budget.charge(len(raw), f"storage {limits.short_repr(key)}")
    storages[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)
  return storages


def _load_legacy(data, extra_allowed, budget, nesting):
  """Layout: magic number, protocol version, sys info, the object pickle, the
  list of storage keys, then per key an int64 element count and raw bytes."""
  stream = io.BytesIO(data)
  plain = lambda: RestrictedUnpickler(stream, budget=budget, _nesting=nesting).load()
  try:
    if plain() != _LEGACY_MAGIC:
      raise TorchFormatError("not a torch.save file: wrong magic number.")
    plain()  # protocol version
    info = plain()
    order = "little" if info.get("little_endian", True) else "big"
    start = stream.tell()
    _, seen = _legacy_pickle(stream, None, extra_allowed, budget, nesting)
    keys = plain()
    storages = _legacy_storages(stream, keys, seen, order, budget)
    stream.seek(start)
    return _legacy_pickle(stream, storages, extra_allowed, budget, nesting)[0]
  except (EOFError, struct.error, KeyError, AttributeError, TypeError) as e:
    raise TorchFormatError(f"legacy torch.save data is malformed or truncated "
                           f"({type(e).__name__}: {str(e)[:200]}).") from None
  except limits.ResourceLimitError as e:
    raise UnsafePickleError(str(e)) from None


def _load_torch_bytes(data, extra_allowed, torchscript, budget, nesting):
  budget = budget or limits.Budget.for_size(len(data), "the torch archive")
  if data[:4] == _ZIP_MAGIC:
    try:
      return _load_zip(data, extra_allowed, torchscript, budget, nesting)
    except limits.ResourceLimitError as e:
      raise UnsafePickleError(str(e)) from None
    except (EOFError, struct.error, zipfile.BadZipFile, OSError) as e:
      raise TorchFormatError(f"torch archive is malformed ({type(e).__name__}: "
                             f"{str(e)[:200]}).") from None
  if torchscript:
    raise TorchFormatError("a TorchScript archive must be a zip file.")
  return _load_legacy(data, extra_allowed, budget, nesting)


def load_torch_zip(path_or_bytes: PathOrBytes, *,
                   extra_allowed: Optional[Mapping[tuple, Any]] = None,
                   torchscript: bool = False) -> Any:
  """Loads a zip `torch.save` (or, with `torchscript`, `torch.jit.save`) archive.

  Tensors become numpy arrays; TorchScript module objects become
  `ScriptObject`s holding their state (their code is never read).
  """
  data = _read_bytes(path_or_bytes)
  if data[:4] != _ZIP_MAGIC:
    raise TorchFormatError("not a torch zip archive (no zip signature).")
  return _load_torch_bytes(data, extra_allowed, torchscript, None, 0)


def load_torch(path_or_bytes: PathOrBytes, *,
               extra_allowed: Optional[Mapping[tuple, Any]] = None) -> Any:
  """Loads a `torch.save` file or bytes (zip or legacy) without torch.

  Tensors become numpy arrays; any global outside the allow-list raises
  `ForbiddenGlobalError`. Works whether or not torch is installed.
  """
  return _load_torch_bytes(_read_bytes(path_or_bytes), extra_allowed, False, None, 0)


# --------------------------------------------------------------------------
# Torch module records -> state dicts.


def _module_state(module, name) -> dict:
  if isinstance(module, (PersistentObject, ModuleRecord)):
    state = module.state
    if "_parameters" in state or "_modules" in state:
      return state
  raise ValueError(f"expected a pickled torch.nn.Module at {name or 'the top'!r}, got "
                   f"{limits.short_repr(module)} without _parameters/_modules.")


def _entries(value, what, name):
  if value is None:
    return []
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise ValueError(f"module {name or 'at the top'!r}: {what} must map names to values.")
  return list(value.items())


def module_state_dict(module) -> dict:
  """Flattens a recorded torch module tree like `torch.nn.Module.state_dict()`.

  Parameters, then persistent buffers, then children (dot-joined names);
  entries that are None and non-persistent buffers are skipped. The modules
  must form a tree: a module reachable along two paths (a DAG, whose walk
  would take exponential time) is refused.
  """
  out, seen = {}, set()
  stack = [(module, "")]
  while stack:
    node, prefix = stack.pop()
    if id(node) in seen:
      raise ValueError(f"module {prefix[:-1]!r} appears twice in the module tree (shared "
                       "submodules are refused: the file is not a plain torch module tree).")
    seen.add(id(node))
    state = _module_state(node, prefix[:-1])
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in _entries(state.get("_parameters"), "_parameters", prefix):
      if value is not None:
        out[prefix + name] = value
    for name, value in _entries(state.get("_buffers"), "_buffers", prefix):
      if value is not None and name not in skip:
        out[prefix + name] = value
    children = [(c, f"{prefix}{n}.") for n, c in _entries(state.get("_modules"), "_modules",
                                                           prefix) if c is not None]
    stack.extend(reversed(children))
  return out
