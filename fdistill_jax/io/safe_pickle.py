"""Restricted unpickling of PyTorch and EDM files, without torch and without exec.

`pickle.load` runs whatever callables a file names, and EDM snapshots
(NVlabs/edm `torch_utils/persistence.py`) even carry Python source that the
reference loader `exec`s. This module reads such files with an allow-list
instead: `find_class` resolves only the globals a network snapshot or a
`torch.save` archive needs, each to a harmless stand-in written here, and
refuses every other global with `ForbiddenGlobalError` naming it.

What the stand-ins do:

* `torch_utils.persistence._reconstruct_persistent_obj(meta)` returns a
  `PersistentObject` (class name, state, recorded init arguments); the pickled
  `module_src` is dropped unread.
* `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` return numpy arrays.
  Storages come from `torch.storage._load_from_bytes(data)`, whose bytes are a
  `torch.save` archive (zip or legacy), parsed here with numpy only.
* `torch.nn` container classes become `ModuleRecord`s that keep their state.

Typical use:

  obj = safe_load(open("network-snapshot.pkl", "rb"))
  weights = module_state_dict(obj["ema"])       # {"model.enc...weight": ndarray}
  sd = load_torch("pt_inception.pth")            # torch.save archive -> numpy
  sd = load_torch(data, torchscript=True)        # TorchScript archive: module state

This is the project's only unpickler: EDM snapshots, torch.save state dicts,
TorchScript archives (FID Inception weights) and `.bin` model files all go
through `RestrictedUnpickler`.
"""

import _compat_pickle
import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping, Optional, Union

import numpy as np

PathOrBytes = Union[str, os.PathLike, bytes]
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # first pickle of a legacy torch.save file
_ZIP_MAGIC = b"PK\x03\x04"


class ForbiddenGlobalError(pickle.UnpicklingError):
  """A pickle named a global outside the allow-list; nothing was called."""


class TorchFormatError(pickle.UnpicklingError):
  """A torch.save archive or tensor record is malformed or truncated."""


@dataclasses.dataclass
class PersistentObject:
  """An EDM `persistence.persistent_class` instance, recorded but not rebuilt.

  Attributes:
    class_name: class name inside the pickled module source, e.g. "EDMPrecond".
    state: the instance `__dict__` as pickled (for torch modules: `_parameters`,
      `_buffers`, `_modules`, `_init_kwargs`, ...).
    version: the persistence format version the file claims (EDM writes 6).
  """
  class_name: str
  state: dict
  version: Optional[int] = None

  @property
  def init_args(self) -> tuple:
    return tuple(self.state.get("_init_args") or ())

  @property
  def init_kwargs(self) -> dict:
    return dict(self.state.get("_init_kwargs") or {})


class ModuleRecord:
  """Stand-in for an allowed class (e.g. torch.nn.ModuleDict): keeps its state.

  Subclasses are made by `record_class`; instances are created by the pickle
  machinery (NEWOBJ / BUILD) and only store what they are given.
  """
  qualname = "ModuleRecord"

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state = args, kwargs, {}
    return obj

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slotstate)
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(
          f"{self.qualname}: expected a dict as object state, got "
          f"{type(state).__name__}.")
    self.state = state

  def __repr__(self):
    return f"ModuleRecord({self.qualname})"


def record_class(module: str, name: str) -> type:
  """Returns a `ModuleRecord` subclass standing in for `module.name`."""
  return type(name, (ModuleRecord,), {"qualname": f"{module}.{name}"})


class ScriptObject:
  """Inert stand-in for a TorchScript module object: keeps only its state."""
  qualname = "ScriptObject"

  def __setstate__(self, state):
    self.state = state


# TorchScript pickles typed lists (e.g. a conv's padding) through these.
_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist",
                      "build_tensorlist")


def _restore_type_tag(value, type_tag):
  del type_tag
  return value


def _torchscript_globals() -> dict:
  """Allow-list entries of TorchScript `data.pkl` records (tensors, lists, state)."""
  allowed = {("torch.jit._pickle", name): list for name in _JIT_LIST_BUILDERS}
  allowed[("torch.jit._pickle", "restore_type_tag")] = _restore_type_tag
  return allowed


class EasyDict(dict):
  """Stand-in for `dnnlib.EasyDict` (a dict with attribute access)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


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


def _np_dtype(code: str, byteorder: str = "little") -> np.dtype:
  if code == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")


@dataclasses.dataclass
class _PendingStorage:
  """Placeholder used while locating the storages of a legacy archive."""
  key: str


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> Any:
  """`torch._utils._rebuild_tensor(_v2)`: a strided view of a storage, copied."""
  if isinstance(storage, _PendingStorage):
    return None
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise TorchFormatError(f"tensor storage must be a 1-D array, got {type(storage)}.")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise TorchFormatError(f"bad tensor layout: offset {offset}, size {size}, "
                           f"stride {stride}.")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if 0 not in size and last >= storage.size:
    raise TorchFormatError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reads past "
        f"its storage of {storage.size} elements: the file is corrupt.")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride])
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  """`torch._utils._rebuild_parameter(_with_state)`: the data array itself."""
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """`torch._tensor._rebuild_from_type_v2`: `func` is an allow-listed stand-in."""
  del new_type, state
  return func(*args)


def _load_storage_bytes(data: bytes) -> np.ndarray:
  """`torch.storage._load_from_bytes`: a torch.save archive of one storage."""
  storage = load_torch(bytes(data))
  if not isinstance(storage, np.ndarray):
    raise TorchFormatError("a pickled torch storage did not hold a storage.")
  return storage


# --------------------------------------------------------------------------
# Small safe builtins, numpy and torch names.


def _safe_codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
    raise pickle.UnpicklingError("_codecs.encode is allowed only on str with "
                                 "latin1/utf-8 encoding.")
  return text.encode(encoding)


def _np_reconstruct(cls, shape, typecode):
  if cls is not np.ndarray:
    raise pickle.UnpicklingError(
        f"numpy _reconstruct is allowed only for numpy.ndarray, got {cls!r}.")
  return np.ndarray.__new__(np.ndarray, shape, typecode)


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(
        f"numpy scalar of dtype {dtype!r} refused: only plain numeric dtypes.")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_frombuffer(buf, dtype, shape, order="C"):
  """numpy's protocol-5 array rebuild, for plain (non-object) dtypes only."""
  dtype = np.dtype(dtype)
  if dtype.hasobject or order not in ("C", "F"):
    raise pickle.UnpicklingError(f"numpy array of dtype {dtype} refused.")
  return np.frombuffer(buf, dtype).reshape(shape, order=order).copy()


def _reconstruct_persistent_obj(meta) -> PersistentObject:
  """EDM's reconstructor, recorded: `meta["module_src"]` is never executed."""
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise pickle.UnpicklingError(
        "torch_utils.persistence record must be a dict with type='class'.")
  class_name, state = meta.get("class_name"), meta.get("state")
  if not isinstance(class_name, str) or not isinstance(state, (dict, type(None))):
    raise pickle.UnpicklingError(
        "torch_utils.persistence record needs a str class_name and a dict state.")
  return PersistentObject(class_name, dict(state or {}), meta.get("version"))


def _default_globals() -> dict:
  """The allow-list: (module, name) -> the harmless object it resolves to."""
  allowed = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "slice"): slice,
      ("builtins", "complex"): complex,
      ("_codecs", "encode"): _safe_codecs_encode,
      ("numpy", "dtype"): np.dtype,
      ("numpy", "ndarray"): np.ndarray,
      ("torch_utils.persistence", "_reconstruct_persistent_obj"):
          _reconstruct_persistent_obj,
      ("dnnlib", "EasyDict"): EasyDict,
      ("dnnlib.util", "EasyDict"): EasyDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
      ("torch", "Size"): tuple,
      ("torch", "device"): str,
  }
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(mod, "scalar")] = _np_scalar
    allowed[(mod, "_reconstruct")] = _np_reconstruct
  for mod in ("numpy.core.numeric", "numpy._core.numeric"):
    allowed[(mod, "_frombuffer")] = _np_frombuffer
  for name, code in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = StorageType(name, code)
  for name, code in _TORCH_DTYPES.items():
    allowed[("torch", name)] = code
  for mod, name in (("torch.nn.modules.container", "ModuleDict"),
                    ("torch.nn.modules.container", "ModuleList"),
                    ("torch.nn.modules.container", "Sequential"),
                    ("torch.nn.modules.module", "Module")):
    allowed[(mod, name)] = record_class(mod, name)
  return allowed


_ALLOWED = _default_globals()


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves globals only through the allow-list.

  Args:
    file: binary file object positioned at a pickle.
    extra_allowed: more `(module, name) -> object` entries; the object is what
      the pickle gets instead of the real global (use `record_class` for
      classes whose instances should just keep their state).
    persistent_load: handler for persistent ids (torch archives); by default
      any persistent id is an error.
  """

  def __init__(self, file: BinaryIO, *,
               extra_allowed: Optional[Mapping[tuple, Any]] = None,
               persistent_load: Optional[Callable[[Any], Any]] = None,
               torchscript: bool = False):
    super().__init__(file)
    self._allowed = {**_ALLOWED, **(_torchscript_globals() if torchscript else {}),
                     **(extra_allowed or {})}
    self._persistent = persistent_load
    self._torchscript = torchscript
    self._script_types = {}

  def find_class(self, module, name):
    # Python 2 names (written by protocol < 3 pickles) map to Python 3 ones,
    # as pickle's own find_class does; the result is still checked below.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if self._torchscript and module.startswith("__torch__."):
      # TorchScript module classes: a data-only record of their state.
      key = f"{module}.{name}"
      return self._script_types.setdefault(
          key, type(name, (ScriptObject,), {"qualname": key}))
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise ForbiddenGlobalError(
          f"refusing to load global '{module}.{name}': it is not on the "
          "allow-list of fdistill_jax.io.safe_pickle (nothing was executed). If "
          "this file is trusted and the global is a plain data container, pass "
          "a stand-in for it via extra_allowed.") from None

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError(
          f"unexpected persistent id {pid!r} in a plain pickle.")
    return self._persistent(pid)


def safe_load(file: BinaryIO, *,
              extra_allowed: Optional[Mapping[tuple, Any]] = None) -> Any:
  """Unpickles `file` with the allow-list; torch tensors become numpy arrays.

  Raises:
    ForbiddenGlobalError: the pickle names a global outside the allow-list.
    pickle.UnpicklingError: the data is malformed or truncated.
  """
  try:
    return RestrictedUnpickler(file, extra_allowed=extra_allowed).load()
  except (EOFError, struct.error) as e:
    raise pickle.UnpicklingError(
        f"pickle data ended early or is malformed ({e!r}): the file looks "
        "truncated; download it again.") from e


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
      or not isinstance(pid[1], StorageType)):
    raise TorchFormatError(f"unsupported persistent id {pid!r} in a torch "
                           "archive: only tensor storages are supported.")
  return pid[1], str(pid[2]), int(pid[4]), (pid[5] if len(pid) > 5 else None)


def _open_zip(data: bytes) -> tuple:
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
                           f"found {pkl or names[:5]}.")
  root = pkl[0][:-len("data.pkl")]
  order = (archive.read(root + "byteorder").decode().strip()
           if root + "byteorder" in names else "little")
  return archive, root, order


def _zip_storage(archive: zipfile.ZipFile, root: str, order: str, pid) -> np.ndarray:
  """The storage a zip archive's persistent id names, as a 1-D array."""
  stype, key, numel, _ = _storage_pid(pid)
  dtype = _np_dtype(stype.dtype, order)
  try:
    raw = archive.read(f"{root}data/{key}")
  except (KeyError, zipfile.BadZipFile) as e:
    raise TorchFormatError(f"storage {key} missing or corrupt in the archive "
                           f"({e}).") from e
  if len(raw) < numel * dtype.itemsize:
    raise TorchFormatError(f"storage {key}: {len(raw)} bytes for {numel} "
                           f"elements of {dtype}; the file is truncated.")
  return np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="), copy=False)


def load_torch_zip(path_or_bytes: PathOrBytes, *,
                   extra_allowed: Optional[Mapping[tuple, Any]] = None,
                   torchscript: bool = False) -> Any:
  """Loads a zip `torch.save` (or, with `torchscript`, `torch.jit.save`) archive.

  Tensors become numpy arrays; TorchScript module objects become
  `ScriptObject`s holding their state (their code is never read).
  """
  archive, root, order = _open_zip(_read_bytes(path_or_bytes))
  try:
    return RestrictedUnpickler(
        io.BytesIO(archive.read(root + "data.pkl")), extra_allowed=extra_allowed,
        torchscript=torchscript,
        persistent_load=lambda pid: _zip_storage(archive, root, order, pid)).load()
  except (EOFError, struct.error, zipfile.BadZipFile) as e:
    raise TorchFormatError(f"torch archive data.pkl is malformed ({e!r}).") from e


def _legacy_pickle(stream, storages, extra_allowed):
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

  obj = RestrictedUnpickler(stream, extra_allowed=extra_allowed,
                            persistent_load=persistent_load).load()
  return obj, seen


def load_torch_legacy(path_or_bytes: PathOrBytes, *,
                      extra_allowed: Optional[Mapping[tuple, Any]] = None) -> Any:
  """Loads a legacy (non-zip) `torch.save` stream with numpy arrays.

  Layout: magic number, protocol version, sys info, the object pickle, the
  list of storage keys, then per key an int64 element count and raw bytes.
  """
  stream = io.BytesIO(_read_bytes(path_or_bytes))
  try:
    if safe_load(stream) != _LEGACY_MAGIC:
      raise TorchFormatError("not a torch.save file: wrong magic number.")
    safe_load(stream)  # protocol version
    info = safe_load(stream)
    order = "little" if info.get("little_endian", True) else "big"
    start = stream.tell()
    _, seen = _legacy_pickle(stream, None, extra_allowed)
    keys = safe_load(stream)
    storages = {}
    for key in keys:
      stype, _ = seen[key]
      dtype = _np_dtype(stype.dtype, order)
      (numel,) = struct.unpack("<q", stream.read(8))
      raw = stream.read(numel * dtype.itemsize)
      if len(raw) < numel * dtype.itemsize:
        raise TorchFormatError(f"storage {key} is truncated.")
      storages[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)
    stream.seek(start)
    return _legacy_pickle(stream, storages, extra_allowed)[0]
  except (EOFError, struct.error, KeyError, AttributeError) as e:
    raise TorchFormatError(f"legacy torch.save data is malformed or truncated "
                           f"({e!r}).") from e


def load_torch(path_or_bytes: PathOrBytes, *,
               extra_allowed: Optional[Mapping[tuple, Any]] = None) -> Any:
  """Loads a `torch.save` file or bytes (zip or legacy) without torch.

  Tensors become numpy arrays; any global outside the allow-list raises
  `ForbiddenGlobalError`. Works whether or not torch is installed.
  """
  data = _read_bytes(path_or_bytes)
  if data[:4] == _ZIP_MAGIC:
    return load_torch_zip(data, extra_allowed=extra_allowed)
  return load_torch_legacy(data, extra_allowed=extra_allowed)


# --------------------------------------------------------------------------
# Torch module records -> state dicts.


def _module_state(module) -> dict:
  if isinstance(module, (PersistentObject, ModuleRecord)):
    state = module.state
    if "_parameters" in state or "_modules" in state:
      return state
  raise ValueError(f"expected a pickled torch.nn.Module, got {module!r} "
                   "without _parameters/_modules.")


def module_state_dict(module) -> dict:
  """Flattens a recorded torch module tree like `torch.nn.Module.state_dict()`.

  Parameters, then persistent buffers, then children (dot-joined names);
  entries that are None and non-persistent buffers are skipped.
  """
  out = {}
  _collect_state(module, "", out)
  return out


def _collect_state(module, prefix: str, out: dict) -> None:
  state = _module_state(module)
  skip = state.get("_non_persistent_buffers_set") or set()
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = value
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in skip:
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      _collect_state(child, f"{prefix}{name}.", out)
