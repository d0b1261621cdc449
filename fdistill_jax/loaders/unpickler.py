"""The bounded allow-list pickle machine (the plain-data half of `fdistill_jax.loaders.safe_pickle`).

`RestrictedUnpickler` is Python's pure-Python pickle machine with every opcode
counted (`MAX_OPCODES`), reads that never go past the input, BUILD
(`__setstate__`) only on module records, checked numpy arrays and dtypes and
dicts, globals resolved only through an allow-list of stand-ins written here,
and the loaded object graph checked (`limits.check_graph`). Torch tensors,
storages and archives are added by `fdistill_jax.loaders.safe_pickle`, whose
docstring lists the whole allow-list and why each entry is safe; use that
module, not this one.
"""

import _compat_pickle
import collections
import dataclasses
import functools
import pickle
import re
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping, Optional

import numpy as np

from fdistill_jax.io import limits

MAX_OPCODES = 2_000_000        # pickle opcodes per load (each makes at most one object)
MAX_SCRIPT_TYPES = 10_000      # distinct __torch__ class names per load


class ForbiddenGlobalError(pickle.UnpicklingError):
  """A pickle named a global outside the allow-list; nothing was called."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for something refused for safety (state, size, depth)."""


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
      raise UnsafePickleError(
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


class EasyDict(dict):
  """Stand-in for `dnnlib.EasyDict` (a dict with attribute access)."""

  def __init__(self, items=(), **kwargs):
    if not isinstance(items, (Mapping, list, tuple)):
      raise UnsafePickleError(f"EasyDict from a {type(items).__name__} refused.")
    super().__init__(items, **kwargs)

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


# --------------------------------------------------------------------------
# Small safe builtins and numpy names.


def check_sequence(value, what):
  if not isinstance(value, (list, tuple)):
    raise UnsafePickleError(f"{what} from a {type(value).__name__} refused: only a list or "
                            "tuple is accepted.")
  return value


def _ordered_dict(items=()):
  return collections.OrderedDict(check_sequence(items, "OrderedDict"))


def _set(items=()):
  return set(check_sequence(items, "set"))


def _frozenset(items=()):
  return frozenset(check_sequence(items, "frozenset"))


def _jit_list(items=()):
  return list(check_sequence(items, "TorchScript list"))


def _restore_type_tag(value, type_tag):
  del type_tag
  return value


def _torch_size(dims=()):
  dims = check_sequence(dims, "torch.Size")
  if len(dims) > 64 or not all(limits.is_dim(d) for d in dims):
    raise UnsafePickleError(f"torch.Size{limits.short_repr(dims)} refused: at most 64 ints in "
                            "[0, 2**62].")
  return tuple(dims)


def _torch_device(spec, index=None):
  if not isinstance(spec, (str, int)) or not isinstance(index, (int, type(None))):
    raise UnsafePickleError(f"torch.device({limits.short_repr(spec)}) refused.")
  return str(spec) if index is None else f"{spec}:{index}"


def _safe_codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
    raise UnsafePickleError("_codecs.encode is allowed only on str with latin1/utf-8 "
                            "encoding.")
  return text.encode(encoding)


# What numpy writes for plain dtypes: an optional byte order and a kind+size code.
_DTYPE_CODE = re.compile(r"[<>|=]?(b1|\?|[iu][1248]|f[248]|c8|c16)\Z")


def _np_dtype(spec, align=False, copy=False):
  """`numpy.dtype(spec, align, copy)` for plain numeric codes, always a fresh copy.

  A copy, because BUILD then sets its byte order: numpy's builtin dtypes are
  process-wide singletons that a file must never modify.
  """
  del align, copy
  if not isinstance(spec, str) or not _DTYPE_CODE.match(spec):
    raise UnsafePickleError(f"numpy dtype {limits.short_repr(spec)} refused: only plain "
                            "numeric and bool dtypes (e.g. 'f4', 'i8', 'b1').")
  return np.dtype(spec, False, True)


def _build_dtype(dtype: np.dtype, state) -> None:
  """BUILD on a dtype: only the byte order of a plain dtype may be set."""
  ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
        and state[1] in ("<", ">", "|", "=") and state[2:] == (None, None, None, -1, -1, 0))
  if not ok:
    raise UnsafePickleError(f"numpy dtype state {limits.short_repr(state)} refused: only the "
                            "byte order of a plain dtype may be set (no fields, offsets, "
                            "subarrays or object flags).")
  itemsize = dtype.itemsize
  dtype.__setstate__(state)
  limits.check_plain_dtype(dtype, "numpy dtype")
  if dtype.itemsize != itemsize:
    raise UnsafePickleError("numpy dtype state changed the item size: refused.")


class _NdarrayName:
  """What the global `numpy.ndarray` resolves to: a name for `_reconstruct`, not a class."""

  def __new__(cls, *args, **kwargs):
    raise UnsafePickleError("creating numpy.ndarray objects directly is refused.")


def _plain_dtype(dtype, where):
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f"{where}: expected a numpy dtype, got {type(dtype).__name__}.")
  try:
    return limits.check_plain_dtype(dtype, where)
  except limits.ResourceLimitError as e:
    raise UnsafePickleError(str(e)) from e


def check_shape(value, where):
  if (not isinstance(value, tuple) or len(value) > 64
      or not all(limits.is_dim(n) for n in value)):
    raise UnsafePickleError(f"{where}: shape {limits.short_repr(value)} refused: at most 64 "
                            "ints in [0, 2**62].")
  return value


def _np_reconstruct(cls, shape, typecode):
  """numpy's `_reconstruct`: only the empty placeholder numpy itself writes."""
  if cls not in (_NdarrayName, np.ndarray) or shape != (0,) or typecode != b"b":
    raise UnsafePickleError(f"numpy _reconstruct{limits.short_repr((cls, shape, typecode))} "
                            "refused: numpy writes only (ndarray, (0,), b'b').")
  return np.ndarray((0,), np.uint8)


def _build_ndarray(array: np.ndarray, state, budget: limits.Budget) -> None:
  """BUILD on an array: (version, shape, dtype, fortran, raw bytes), all checked."""
  if isinstance(state, tuple) and len(state) == 4:
    state = (1,) + state
  if not (isinstance(state, tuple) and len(state) == 5 and state[0] in (0, 1)):
    raise UnsafePickleError(f"numpy array state {limits.short_repr(state)} refused.")
  _, shape, dtype, fortran, raw = state
  check_shape(shape, "numpy array")
  _plain_dtype(dtype, "numpy array")
  if not isinstance(fortran, bool) or not isinstance(raw, (bytes, bytearray)):
    raise UnsafePickleError("numpy array state must hold a bool and raw bytes.")
  nbytes = limits.nbytes_of(shape, dtype.itemsize)
  if nbytes != len(raw):
    raise UnsafePickleError(f"numpy array of shape {shape} ({dtype.str}) needs {nbytes:,} "
                            f"bytes but the file holds {len(raw):,}: refused.")
  budget.charge(nbytes, f"numpy array of shape {shape}")
  array.__setstate__(state)


def _np_scalar(dtype, data=None):
  dtype = _plain_dtype(dtype, "numpy scalar")
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise UnsafePickleError(f"numpy scalar of {dtype.str} needs exactly {dtype.itemsize} bytes.")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_frombuffer(buf, dtype, shape, order="C", *, budget):
  """numpy's protocol-5 array rebuild, for plain dtypes and exact buffer sizes only."""
  dtype = _plain_dtype(dtype, "numpy array")
  shape = check_shape(tuple(shape) if isinstance(shape, list) else shape, "numpy array")
  raw = memoryview(buf) if isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)) else None
  if raw is None or order not in ("C", "F"):
    raise UnsafePickleError("numpy array buffer or order refused.")
  nbytes = limits.nbytes_of(shape, dtype.itemsize)
  if raw.nbytes != nbytes:
    raise UnsafePickleError(f"numpy array of shape {shape} needs {nbytes:,} bytes, the buffer "
                            f"has {raw.nbytes:,}: refused.")
  budget.charge(nbytes, f"numpy array of shape {shape}")
  return np.frombuffer(raw, dtype).reshape(shape, order=order).copy()


def _reconstruct_persistent_obj(meta) -> PersistentObject:
  """EDM's reconstructor, recorded: `meta["module_src"]` is never executed."""
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise UnsafePickleError(
        "torch_utils.persistence record must be a dict with type='class'.")
  class_name, state = meta.get("class_name"), meta.get("state")
  if not isinstance(class_name, str) or not isinstance(state, (dict, type(None))):
    raise UnsafePickleError(
        "torch_utils.persistence record needs a str class_name and a dict state.")
  return PersistentObject(class_name, dict(state or {}), meta.get("version"))


# --------------------------------------------------------------------------
# The allow-list and the unpickler.


def _default_globals() -> dict:
  """The plain-data part of the allow-list (fdistill_jax.loaders.safe_pickle adds tensors)."""
  allowed = {
      ("collections", "OrderedDict"): _ordered_dict,
      ("builtins", "set"): _set,
      ("builtins", "frozenset"): _frozenset,
      ("builtins", "slice"): slice,
      ("builtins", "complex"): complex,
      ("_codecs", "encode"): _safe_codecs_encode,
      ("numpy", "dtype"): _np_dtype,
      ("numpy", "ndarray"): _NdarrayName,
      ("torch_utils.persistence", "_reconstruct_persistent_obj"):
          _reconstruct_persistent_obj,
      ("dnnlib", "EasyDict"): EasyDict,
      ("dnnlib.util", "EasyDict"): EasyDict,
      ("torch", "Size"): _torch_size,
      ("torch", "device"): _torch_device,
  }
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(mod, "scalar")] = _np_scalar
    allowed[(mod, "_reconstruct")] = _np_reconstruct
  for mod, name in (("torch.nn.modules.container", "ModuleDict"),
                    ("torch.nn.modules.container", "ModuleList"),
                    ("torch.nn.modules.container", "Sequential"),
                    ("torch.nn.modules.module", "Module")):
    allowed[(mod, name)] = record_class(mod, name)
  return allowed


def numpy_budgeted_globals(budget) -> dict:
  """numpy's protocol-5 array rebuild, bound to a load's budget."""
  frombuffer = functools.partial(_np_frombuffer, budget=budget)
  return {(mod, "_frombuffer"): frombuffer
          for mod in ("numpy.core.numeric", "numpy._core.numeric")}


def torchscript_globals() -> dict:
  """Allow-list entries of TorchScript `data.pkl` records (lists, type tags)."""
  allowed = {("torch.jit._pickle", name): _jit_list for name in (
      "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")}
  allowed[("torch.jit._pickle", "restore_type_tag")] = _restore_type_tag
  return allowed


BASE_GLOBALS = _default_globals()


def _children(obj):
  """Objects a loaded container refers to (None for leaves): for `limits.check_graph`."""
  if isinstance(obj, dict):
    extra = getattr(obj, "__dict__", None)
    return list(obj.keys()) + list(obj.values()) + (list(extra.values()) if extra else [])
  if isinstance(obj, (list, tuple, set, frozenset)):
    return list(obj)
  if isinstance(obj, ModuleRecord):
    return [obj.args, obj.kwargs, obj.state]
  if isinstance(obj, (PersistentObject, ScriptObject)):
    return [getattr(obj, "state", None)]
  if isinstance(obj, slice):
    return [obj.start, obj.stop, obj.step]
  return None


def _counted(load_op):
  def load(self):
    self._opcodes += 1
    if self._opcodes > MAX_OPCODES:
      raise UnsafePickleError(f"the pickle has more than {MAX_OPCODES:,} opcodes: refused.")
    load_op(self)
  return load


class RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """A pickle machine that resolves globals only through the allow-list (module docstring).

  `fdistill_jax.loaders.safe_pickle.RestrictedUnpickler` adds torch tensors and storages.

  Args:
    file: binary file object positioned at a pickle (reads never go past its end).
    extra_allowed: more `(module, name) -> object` entries; the object is what
      the pickle gets instead of the real global (use `record_class` for
      classes whose instances should just keep their state).
    persistent_load: handler for persistent ids (torch archives); by default
      any persistent id is an error.
    torchscript: also allow TorchScript records (`__torch__.*` classes).
    budget: byte allowance for arrays (default: `limits.Budget.for_size` of the input).
  """

  dispatch = {key: _counted(op) for key, op in pickle._Unpickler.dispatch.items()}  # pylint: disable=protected-access

  def budgeted_globals(self, budget, nesting) -> dict:
    """Allow-list entries that allocate, bound to this load's budget (subclasses add more)."""
    del nesting
    return numpy_budgeted_globals(budget)

  def __init__(self, file: BinaryIO, *,
               extra_allowed: Optional[Mapping[tuple, Any]] = None,
               persistent_load: Optional[Callable[[Any], Any]] = None,
               torchscript: bool = False, budget: Optional[limits.Budget] = None,
               _nesting: int = 0):
    file = limits.bounded(file)
    super().__init__(file)
    self.budget = budget or limits.Budget.for_size(file.size, "the pickle")
    self._allowed = {**BASE_GLOBALS, **self.budgeted_globals(self.budget, _nesting),
                     **(torchscript_globals() if torchscript else {}),
                     **(extra_allowed or {})}
    self._persistent = persistent_load
    self._torchscript = torchscript
    self._script_types = {}
    self._opcodes = 0
    self._tuples, self._tuple_refs = {}, []

  def find_class(self, module, name):
    if not isinstance(module, str) or not isinstance(name, str):
      raise UnsafePickleError("global names must be strings.")
    # Python 2 names (written by protocol < 3 pickles) map to Python 3 ones,
    # as pickle's own find_class does; the result is still checked below.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if self._torchscript and module.startswith("__torch__."):
      # TorchScript module classes: a data-only record of their state.
      key = f"{module}.{name}"
      if key not in self._script_types and len(self._script_types) >= MAX_SCRIPT_TYPES:
        raise UnsafePickleError(f"more than {MAX_SCRIPT_TYPES} TorchScript class names.")
      return self._script_types.setdefault(
          key, type(name, (ScriptObject,), {"qualname": key}))
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise ForbiddenGlobalError(
          f"refusing to load global '{module[:100]}.{name[:100]}': it is not on the "
          "allow-list of fdistill_jax.loaders.safe_pickle (nothing was executed). If "
          "this file is trusted and the global is a plain data container, pass "
          "a stand-in for it via extra_allowed.") from None

  def persistent_load(self, pid):
    if self._persistent is None:
      raise UnsafePickleError(
          f"unexpected persistent id {limits.short_repr(pid)} in a plain pickle.")
    return self._persistent(pid)

  def load_build(self):
    """BUILD only on records, validated arrays and dtypes, and dicts (module docstring)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, (ModuleRecord, ScriptObject)):
      inst.__setstate__(state)
    elif isinstance(inst, np.dtype):
      _build_dtype(inst, state)
    elif isinstance(inst, np.ndarray):
      _build_ndarray(inst, state, self.budget)
    elif type(inst) in (collections.OrderedDict, EasyDict) and isinstance(state, dict) and all(
        isinstance(k, str) for k in state):
      inst.__dict__.update(state)      # e.g. a state dict's `_metadata` attribute
    else:
      raise UnsafePickleError(f"setting the state of a {type(inst).__name__} object is "
                              "refused (only module records, arrays, dtypes and dicts).")

  dispatch[pickle.BUILD[0]] = _counted(load_build)

  def load_bytearray8(self):
    """BYTEARRAY8 reading first (pickle's own allocates the claimed length, then reads)."""
    (size,) = struct.unpack("<Q", self.read(8))
    data = self.read(size)
    if len(data) != size:
      raise pickle.UnpicklingError(f"a byte array claims {size:,} bytes, {len(data):,} follow")
    self.append(bytearray(data))

  dispatch[pickle.BYTEARRAY8[0]] = _counted(load_bytearray8)

  def _check_new_tuple(self):
    """Depth and expanded size of the tuple just pushed, refused before anything hashes it.

    Hashing or comparing a tuple recurses in C through nested tuples (no cache,
    no depth guard): a tuple nested 250,000 deep as a dict key or set element
    crashes the interpreter, and a 'billion laughs' of tuples takes 10^9 steps.
    Both are refused here, when the tuple is made, not after the load.
    """
    tup = self.stack[-1]
    depth, size = 1, 1
    for item in tup:
      if type(item) is tuple:  # pylint: disable=unidiomatic-typecheck
        d, n = self._tuples.get(id(item), (1, 1 + len(item)))
        depth, size = max(depth, d + 1), size + n
      else:
        size += 1
    if depth > limits.MAX_DEPTH:
      raise UnsafePickleError(f"the pickle nests tuples more than {limits.MAX_DEPTH} deep: "
                              "refused while reading (before anything hashes them).")
    if size > limits.MAX_EXPANDED:
      raise UnsafePickleError(
          f"the pickle holds a tuple that expands to more than {limits.MAX_EXPANDED:,} nodes "
          "through shared references: refused while reading.")
    self._tuples[id(tup)] = (depth, size)
    self._tuple_refs.append(tup)     # keeps the id valid for the whole load

  def _tuple_op(op):  # pylint: disable=no-self-argument
    def load(self):
      op(self)  # pylint: disable=not-callable
      self._check_new_tuple()
    return load

  for _op in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
    dispatch[getattr(pickle, _op)[0]] = _counted(_tuple_op(
        pickle._Unpickler.dispatch[getattr(pickle, _op)[0]]))  # pylint: disable=protected-access
  del _op, _tuple_op

  def load(self):
    """Unpickles, then checks the object graph; any malformed input is an UnpicklingError."""
    try:
      obj = super().load()
      limits.check_graph(obj, _children)
      return obj
    except pickle.UnpicklingError as e:
      if type(e) is not pickle.UnpicklingError:      # ours: already says what was wrong
        raise
      raise pickle.UnpicklingError(f"pickle data is truncated or malformed ({e}); download "
                                   "the file again.") from None
    except limits.ResourceLimitError as e:
      raise UnsafePickleError(str(e)) from None
    except (EOFError, struct.error, TypeError, ValueError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError, zipfile.BadZipFile) as e:
      raise pickle.UnpicklingError(
          f"pickle data is truncated or malformed ({type(e).__name__}: {str(e)[:200]}); "
          "download the file again.") from None
