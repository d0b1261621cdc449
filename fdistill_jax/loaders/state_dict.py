"""The one state-dict reader: weight files read without executing them or trusting their headers.

  read_state_dict(path)   # {name: numpy array} of .safetensors, .npz, .pt/.pth/.bin/.ckpt,
                          # or a sharded `*.index.json`
  read_file(path)         # the file's object as stored (EDM's snapshots wrap networks in dicts)

* `.safetensors`: read by the `safetensors` library (`safe_open(framework="np")`),
  after `check_safetensors` has read the 8-byte length and the JSON header
  itself and checked them: a header length inside the file and at most
  `MAX_HEADER_BYTES`, a JSON object, known dtypes, non-negative integer shapes
  whose byte size (exact Python integers, no overflow) equals the entry's
  offsets, offsets inside the data section and not overlapping, and the total
  within the file's byte budget (`limits.Budget`). Every allocation is then a
  tensor the file really holds, so the arrays together never take more than
  the file's size.
* `.npz`: every member's header is checked before its array is allocated
  (`fdistill_jax.io.limits.load_npz`).
* `.bin` / `.ckpt` / `.pt` / `.pth`: `torch.save` archives through
  `fdistill_jax.loaders.safe_pickle` (allow-list unpickler: no torch, a forbidden
  global is refused before anything is called).
* Sharded checkpoints: `*.index.json` with a `weight_map` naming files of the
  same folder.

Errors are `ConversionError`s that name the file and the offending entry.
"""

import json
import pathlib
import pickle
import zipfile
from typing import Iterable, Mapping, Optional

import numpy as np

from fdistill_jax.io import limits
from fdistill_jax.loaders import safe_pickle
from fdistill_jax.loaders.errors import ConversionError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit.


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return np.dtype(ml_dtypes.bfloat16)


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": None}


def _dtype(code, name, path):
  if code not in _DTYPES:
    raise ConversionError(f"{path}: tensor {name!r} has dtype {code!r}; supported: "
                          f"{sorted(_DTYPES)}.")
  return _bfloat16() if code == "BF16" else np.dtype(_DTYPES[code])


def _read_header(f, size, path) -> tuple:
  """(header dict, data section start) after checking the length prefix."""
  prefix = f.read(8)
  if len(prefix) < 8:
    raise ConversionError(f"{path}: {size} bytes is too short for a safetensors file "
                          "(8-byte header length missing); the file is truncated.")
  n = int.from_bytes(prefix, "little")
  if n > min(size - 8, MAX_HEADER_BYTES):
    raise ConversionError(f"{path}: the header claims {n} bytes but the file has {size - 8} "
                          f"after the length prefix (limit {MAX_HEADER_BYTES}): not a valid "
                          "safetensors file, or truncated.")
  try:
    header = json.loads(f.read(n).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ConversionError(f"{path}: the safetensors header is not valid JSON ({e}).") from e
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: the safetensors header must be a JSON object.")
  return header, 8 + n


def _entry(name, info, data_size, path) -> tuple:
  """(dtype, shape, begin, end) of one header entry, checked against the data size."""
  if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
    raise ConversionError(f"{path}: header entry {name!r} must have exactly dtype, shape and "
                          f"data_offsets; got {info!r:.200}.")
  dtype = _dtype(info["dtype"], name, path)
  shape, offsets = info["shape"], info["data_offsets"]
  ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)
  if not ints(shape) or not ints(offsets) or len(offsets) != 2:
    raise ConversionError(f"{path}: tensor {name!r} has shape {shape!r:.100} and data_offsets "
                          f"{offsets!r:.100}; both must be lists of non-negative integers.")
  begin, end = offsets
  if not begin <= end <= data_size:
    raise ConversionError(f"{path}: tensor {name!r} claims bytes [{begin}, {end}) but the data "
                          f"section has {data_size} bytes: the header lies or the file is "
                          "truncated.")
  nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize  # exact: Python integers
  if nbytes != end - begin:
    raise ConversionError(f"{path}: tensor {name!r} of shape {shape} ({info['dtype']}) needs "
                          f"{nbytes} bytes but its offsets span {end - begin}: the header lies.")
  return dtype, tuple(shape), begin, end


def _check_overlaps(entries, path):
  spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
  for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
    if b1 < e0:
      raise ConversionError(f"{path}: tensors {a!r} and {b!r} overlap in the data section: "
                            "the header lies.")


def check_safetensors(path) -> dict:
  """{name: (dtype, shape, begin, end)} of a `.safetensors` header, checked (module docstring)
  before any tensor is read."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    header, start = _read_header(f, size, path)
  header.pop("__metadata__", None)
  entries = {name: _entry(name, info, size - start, path) for name, info in header.items()}
  _check_overlaps(entries, path)
  budget = limits.Budget.for_size(size, str(path))
  for name, (_, _, begin, end) in entries.items():
    budget.charge(end - begin, f"tensor {name!r}")
  return entries


def read_safetensors(path) -> dict:
  """{name: numpy array} from a `.safetensors` file: header checked first, then read by the
  `safetensors` library."""
  entries = check_safetensors(path)   # (BF16 entries imported ml_dtypes: numpy knows bfloat16)
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"reading {path} needs the 'safetensors' package: "
                          "pip install safetensors.") from e
  try:
    with safe_open(str(path), framework="np") as f:
      out = {name: f.get_tensor(name) for name in entries}
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises SafetensorError)
    raise ConversionError(f"cannot read {path} as .safetensors: {e}") from e
  for name, (dtype, shape, _, _) in entries.items():
    if out[name].dtype != dtype or out[name].shape != shape:
      raise ConversionError(f"{path}: tensor {name!r} was read as {out[name].dtype} "
                            f"{out[name].shape}, its header says {dtype} {shape}.")
  return out


class RefusedPickle(ConversionError, pickle.UnpicklingError):
  """A `torch.save` file the allow-list unpickler refused or could not read."""


def read_torch(path):
  """A `torch.save` file's object through the allow-list unpickler; errors name the file."""
  try:
    return safe_pickle.load_torch(path)
  except pickle.UnpicklingError as e:
    raise RefusedPickle(f"{path}: refused or unreadable ({type(e).__name__}: {e})") from e


def read_npz(path) -> dict:
  """An `.npz` file; every member's header is checked before its array is allocated."""
  try:
    return limits.load_npz(path)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f"cannot read {path} as .npz: {e}") from e


READERS = {".safetensors": read_safetensors, ".npz": read_npz, ".bin": read_torch,
           ".ckpt": read_torch, ".pt": read_torch, ".pth": read_torch}


def read_file(path):
  """The object a weight file stores (`READERS` by suffix): a state dict, or for torch files
  whatever was saved (e.g. EDM's {'ema': network})."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weight file {path} does not exist.")
  reader = READERS.get(path.suffix.lower())
  if reader is None:
    raise ConversionError(f"{path}: unknown weight format {path.suffix!r}; expected one of "
                          f"{sorted(READERS)} or a sharded *.index.json.")
  return reader(path)


def flat_state_dict(obj, path) -> dict:
  """Checks for a flat {str: array} mapping (after unwrapping a `state_dict` entry)."""
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if not bad:
      return dict(obj)
    obj_keys = bad[:5]
  else:
    obj_keys = type(obj).__name__
  raise ConversionError(f"{path} must hold a flat {{name: tensor}} state dict (or one under "
                        f"'state_dict'); found non-tensor entries {obj_keys}.")


def read_state_dict(path) -> dict:
  """{name: array} of a weight file (`READERS`) or a sharded `*.index.json` index."""
  path = pathlib.Path(path)
  if path.name.endswith(".index.json"):
    if not path.is_file():
      raise FileNotFoundError(f"weight index {path} does not exist.")
    return _read_sharded(path)
  return flat_state_dict(read_file(path), path)


def _read_sharded(index_path) -> dict:
  if index_path.stat().st_size > MAX_HEADER_BYTES:
    raise ConversionError(f"{index_path}: {index_path.stat().st_size} bytes is more than a "
                          f"sharded-checkpoint index holds (limit {MAX_HEADER_BYTES}).")
  try:
    weight_map = limits.json_load(index_path)["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{index_path}: not a sharded-checkpoint index ({e!r}).") from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ConversionError(f"{index_path}: weight_map must be a JSON object of tensor name -> "
                          f"shard file name, got {limits.short_repr(weight_map)}.")
  files = sorted(set(weight_map.values()))
  escaping = [f for f in files if pathlib.PurePath(f).name != f]
  if escaping:
    raise ConversionError(f"{index_path} names shard files outside its folder: {escaping}.")
  nested = [f for f in files if f.endswith(".index.json")]
  if nested:
    raise ConversionError(f"{index_path} names other indexes as shards: {nested}.")
  out = {}
  for name in files:
    out.update(read_state_dict(index_path.parent / name))
  return out


def weight_candidates(stems: Iterable[str], variant: Optional[str] = None) -> list:
  """File names to try, safetensors first: stem[.variant].safetensors[.index.json], then .bin."""
  v = f".{variant}" if variant else ""
  return [f"{stem}{v}{ext}" for ext in (".safetensors", ".safetensors.index.json", ".bin",
                                        ".bin.index.json") for stem in stems]


def read_component(folder, stems: Iterable[str], variant: Optional[str] = None) -> tuple:
  """(state dict, file read) of a model-folder component such as `unet/`."""
  folder = pathlib.Path(folder)
  names = weight_candidates(stems, variant)
  for name in names:
    path = folder / name
    if path.is_file():
      return read_state_dict(path), path
  found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
  raise ConversionError(f"{folder}: no weights found; looked for {names}, found {found}.")

