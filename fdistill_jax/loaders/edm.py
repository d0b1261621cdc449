"""EDM teacher files: read official snapshots safely, convert them, load converted ones.

The `Teacher` records a run distils are built in `fdistill_jax.problems.image`.

Inputs (`read_teacher`):

* `.pkl`: an EDM network snapshot (NVlabs/edm `training/training_loop.py`
  pickles `dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`).
  It is read with `fdistill_jax.loaders.safe_pickle` (allow-list, no torch, the
  pickled source code is never executed). The architecture is the init
  arguments EDM recorded for the `EDMPrecond` object (`_init_kwargs`).
* `.npz`, `.pt`/`.pth` (a `torch.save`d state dict, read without torch) or
  `.safetensors`: an `EDMPrecond.state_dict()` plus an architecture JSON
  (EDMPrecond kwargs, like the fixtures' `*_config.json`).
* a directory written by `convert`: `arch.json` + `variables/` (orbax).
* the workdir of a teacher trained here (`method='edm'`, `fdistill_jax.train.denoiser_training`):
  it holds the same layout under `teacher/` (`trained_teacher_dir`).

Command line (`fdistill_jax.tools.convert`):

  python -m fdistill_jax.tools.convert --input edm-cifar10-32x32-cond-vp.pkl \\
      --output teachers/cifar10

Then `module, variables = load_edm("teachers/cifar10")` and
`module.apply(variables, x_nhwc, sigma, one_hot_labels)`.
"""

import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.loaders.edm_variables import MAX_PARAMS
from fdistill_jax.models.edm import build_edm
from fdistill_jax.models import edm as edm_models
from fdistill_jax.loaders.edm_variables import declared_param_count
from fdistill_jax.loaders.edm_variables import variable_shapes
from fdistill_jax.loaders.edm_variables import variables_from_state_dict
from fdistill_jax.io import atomic
from fdistill_jax.io import limits
from fdistill_jax.loaders import safe_pickle
from fdistill_jax.loaders import state_dict as state_dict_lib
from fdistill_jax.loaders.errors import ConversionError

PathLike = Union[str, os.PathLike]
ARCH_FILE = "arch.json"
VARIABLES_DIR = "variables"
TRAINED_DIR = "teacher"               # a method='edm' workdir's converted teacher
SOURCE_FILE = "source.json"            # the converted file's name and SHA-256
MAX_ARCH_BYTES = 2**20
MAX_EXPANSION = 64                     # converted variables/: float32 bytes per byte on disk
SUPPORTED_PRECONDS = ("EDMPrecond",)
STATE_DICT_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")   # read by `loaders.state_dict`
# EDMPrecond's positional parameters, to name any recorded `_init_args`.
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16",
                       "sigma_min", "sigma_max", "sigma_data", "model_type")


# --------------------------------------------------------------------------
# Architecture arguments.


def _jsonable(value, where: str):
  """Plain JSON types from recorded init arguments (tuples -> lists; str keys only).

  The value comes from an unpickled file whose object graph was already bounded
  (`io.limits.check_graph`: no cycles, limited depth and expanded size).
  """
  if isinstance(value, np.generic) and value.dtype.kind in "biuf":
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, where) for v in value]
  if isinstance(value, dict):
    if not all(isinstance(k, str) for k in value):
      raise ConversionError(f"{where}: init arguments must have string names.")
    return {k: _jsonable(v, where) for k, v in value.items()}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise ConversionError(f"{where}: init argument of type {type(value).__name__} "
                        "cannot be stored as architecture JSON.")


def check_arch(arch: Mapping[str, Any], where) -> dict:
  """`models.edm.check_arch` (types, ranges, sizes), as a ConversionError naming the source."""
  try:
    edm_models.check_arch(arch)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None
  return dict(arch)


def arch_from_snapshot_network(net: safe_pickle.PersistentObject) -> dict:
  """EDMPrecond constructor arguments recorded in a snapshot's network.

  Returns:
    `{"precond": class name, **init kwargs}` in the format of `build_edm`.
  """
  if net.class_name not in SUPPORTED_PRECONDS:
    raise ConversionError(
        f"snapshot network is a {net.class_name}; only {SUPPORTED_PRECONDS} "
        "teachers are supported (VP/VE/iDDPM preconditioning is not ported).")
  if "_init_kwargs" not in net.state or net.state["_init_kwargs"] is None:
    raise ConversionError(
        f"the {net.class_name} object records no _init_kwargs, so its "
        "architecture is unknown: convert its state dict with --arch instead.")
  args = net.init_args
  if len(args) > len(_PRECOND_POSITIONAL):
    raise ConversionError(f"{net.class_name} recorded {len(args)} positional "
                          f"init args; at most {len(_PRECOND_POSITIONAL)} exist.")
  arch = {"precond": net.class_name, **dict(zip(_PRECOND_POSITIONAL, args)),
          **net.init_kwargs}
  return check_arch(_jsonable(arch, net.class_name), f"recorded {net.class_name} arguments")


def read_arch(arch: Union[PathLike, Mapping[str, Any]]) -> dict:
  """Architecture from a mapping or a JSON file (EDMPrecond kwargs)."""
  if isinstance(arch, Mapping):
    return check_arch(arch, "arch")
  path = pathlib.Path(arch)
  if not path.is_file():
    raise FileNotFoundError(f"architecture JSON {path} does not exist.")
  if path.stat().st_size > MAX_ARCH_BYTES:
    raise ConversionError(f"architecture file {path} has {path.stat().st_size:,} bytes; an "
                          f"EDMPrecond argument list has far fewer (limit {MAX_ARCH_BYTES:,}).")
  try:
    value = limits.json_load(path, f"architecture file {path}")
  except ValueError as e:
    raise ConversionError(f"{e}" if "is not valid JSON" in str(e) else
                          f"architecture file {path} is not valid JSON: {e}") from None
  if not isinstance(value, dict) or "img_resolution" not in value:
    raise ConversionError(
        f"architecture file {path} must hold a JSON object of EDMPrecond "
        "kwargs (img_resolution, img_channels, label_dim, model_type, ...).")
  return check_arch(value, path)


# --------------------------------------------------------------------------
# Reading teachers.


def _snapshot_network(obj, path) -> safe_pickle.PersistentObject:
  """The EDMPrecond record in a snapshot (`ema`) or training state (`net`)."""
  if not isinstance(obj, dict) or not ({"ema", "net"} & set(obj)):
    found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ConversionError(
        f"{path} is not an EDM network snapshot: expected a dict with key "
        f"'ema' (as training_loop.py writes), found {found}.")
  net = obj["ema"] if "ema" in obj else obj["net"]
  if not isinstance(net, safe_pickle.PersistentObject):
    raise ConversionError(
        f"{path}: the network is a {type(net).__name__}, not an EDM "
        "persistent-class object (torch_utils.persistence).")
  return net


def read_snapshot(path: PathLike) -> tuple[dict, dict]:
  """Reads an EDM `.pkl` snapshot without executing it.

  Returns:
    (arch, state_dict): EDMPrecond kwargs and `{name: np.ndarray}` exactly as
    `EDMPrecond.state_dict()` would give.

  Raises:
    safe_pickle.ForbiddenGlobalError: the file names a non-allowed global.
    pickle.UnpicklingError: truncated or malformed data.
    ConversionError: the pickle is not an EDM snapshot.
  """
  with open(path, "rb") as f:
    obj = safe_pickle.safe_load(f)
  net = _snapshot_network(obj, path)
  return arch_from_snapshot_network(net), safe_pickle.module_state_dict(net)


def _flat_arrays(obj, path) -> dict:
  """Checks for a flat {name: array} state dict."""
  if isinstance(obj, Mapping) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    return dict(obj)
  keys = sorted(map(str, obj))[:5] if isinstance(obj, Mapping) else "-"
  raise ConversionError(
      f"{path} must hold a flat {{name: tensor}} state dict, e.g. "
      f"torch.save(net.state_dict(), path); got {type(obj).__name__} with keys {keys}.")


def read_teacher(path: PathLike,
                 arch: Optional[Union[PathLike, Mapping[str, Any]]] = None
                 ) -> tuple[dict, dict]:
  """(arch, EDM state dict) from a `.pkl` snapshot or a state-dict file + arch.

  Args:
    path: `.pkl`, `.npz`, `.pt`, `.pth` or `.safetensors`.
    arch: EDMPrecond kwargs (mapping or JSON path); required for state dicts,
      and overrides the recorded ones for snapshots.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"teacher file {path} does not exist.")
  suffix = path.suffix.lower()
  if suffix == ".pkl":
    recorded, state_dict = read_snapshot(path)
    return (read_arch(arch) if arch is not None else recorded), state_dict
  if suffix not in STATE_DICT_SUFFIXES:
    raise ConversionError(
        f"{path}: unknown teacher format {suffix!r}; expected .pkl (EDM snapshot)"
        f", a converted directory, or one of {sorted(STATE_DICT_SUFFIXES)} + --arch.")
  obj = state_dict_lib.read_file(path)
  net = obj.get("ema", obj.get("net")) if isinstance(obj, dict) else None
  if isinstance(net, safe_pickle.PersistentObject):  # EDM training-state .pt
    return (read_arch(arch) if arch is not None else
            arch_from_snapshot_network(net)), safe_pickle.module_state_dict(net)
  if isinstance(net, Mapping):  # {"ema": state_dict}
    obj = net
  if arch is None:
    raise ConversionError(
        f"{path} is a plain state dict and carries no architecture: pass "
        "--arch ARCH.json (EDMPrecond kwargs, like the fixtures' *_config.json).")
  return read_arch(arch), _flat_arrays(obj, path)


def teacher_variables(arch: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                      source: PathLike = "state dict"):
  """Flax variables for `build_edm(arch)`; size, name and shape mismatches get context.

  The declared parameter count is checked (at most `MAX_PARAMS`)
  before any array is converted.
  """
  try:
    declared_param_count(arch)
    return variables_from_state_dict(arch, state_dict)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


# --------------------------------------------------------------------------
# Converted directories.


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer()


def save_converted(output: PathLike, arch: Mapping[str, Any], variables,
                   overwrite: bool = False, source: Optional[Mapping[str, Any]] = None
                   ) -> pathlib.Path:
  """Writes `arch.json`, orbax `variables/` and `source.json` atomically (`io.atomic.write_dir`)."""
  def fill(tmp):
    pathlib.Path(tmp, ARCH_FILE).write_text(json.dumps(dict(arch), indent=1, sort_keys=True))
    if source is not None:
      pathlib.Path(tmp, SOURCE_FILE).write_text(json.dumps(dict(source), indent=1))
    checkpointer = _checkpointer()
    checkpointer.save(pathlib.Path(tmp, VARIABLES_DIR).absolute(), variables)
    checkpointer.wait_until_finished()
  try:
    return pathlib.Path(atomic.write_dir(os.fspath(output), fill, overwrite=overwrite,
                                         tool="fdistill_jax.tools.convert"))
  except atomic.OutputError as e:
    raise ConversionError(str(e)) from e


def trained_teacher_dir(workdir: PathLike) -> str:
  """Where a `method='edm'` run writes its teacher in the converted layout: WORKDIR/teacher."""
  return os.path.join(os.path.abspath(workdir), TRAINED_DIR)


def resolve_converted(directory: PathLike) -> pathlib.Path:
  """A converted directory itself, or the teacher a `method='edm'` workdir holds."""
  directory = pathlib.Path(directory).absolute()
  trained = directory / TRAINED_DIR
  if not (directory / ARCH_FILE).is_file() and (trained / ARCH_FILE).is_file():
    return trained
  return directory


def _saved_shapes(directory: pathlib.Path) -> Optional[dict]:
  """{path: shape} of a converted directory's orbax metadata (nothing is read but it)."""
  try:
    tree = _checkpointer().metadata(directory / VARIABLES_DIR).item_metadata.tree
  except Exception:  # pylint: disable=broad-except  (orbax raises several types)
    return None
  return {jax.tree_util.keystr(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_converted(directory: PathLike, dtype=jnp.float32, attention="xla"):
  """(module, variables) from a directory written by `convert` (or the workdir of a
  method='edm' run: its `teacher/`).

  `arch.json` is checked (`check_arch`), its parameter bytes may be at most
  `MAX_EXPANSION` x the size of `variables/` on disk (orbax compresses; zeros
  would let a tiny directory claim gigabytes), and the saved arrays' names and
  shapes (orbax metadata) are compared with the ones it declares before anything
  is restored: the restore allocates exactly what the checked architecture needs.
  """
  directory = resolve_converted(directory)
  if not (directory / ARCH_FILE).is_file() or not (directory / VARIABLES_DIR).is_dir():
    raise ConversionError(f"{directory} is not a converted teacher: expected "
                          f"{ARCH_FILE} and {VARIABLES_DIR}/ (run "
                          "python -m fdistill_jax.tools.convert first), or the workdir of a "
                          f"finished method='edm' run (it writes {TRAINED_DIR}/ at the end).")
  arch = read_arch(directory / ARCH_FILE)
  try:
    count = declared_param_count(arch)
    target = variable_shapes(arch)
  except ValueError as e:
    raise ConversionError(f"{directory / ARCH_FILE}: {e}") from None
  on_disk = sum(p.stat().st_size for p in (directory / VARIABLES_DIR).rglob("*") if p.is_file())
  if 4 * count > MAX_EXPANSION * on_disk + limits.BUDGET_SLACK:
    raise ConversionError(f"{directory}: {ARCH_FILE} declares {count:,} parameters but "
                          f"{VARIABLES_DIR}/ holds only {on_disk:,} bytes (trained weights do "
                          "not compress that far); convert the teacher again.")
  want = {jax.tree_util.keystr(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  saved = _saved_shapes(directory)
  if saved != want:
    differ = sorted(k for k in set(want) | set(saved or {})
                    if (saved or {}).get(k) != want.get(k))[:3]
    raise ConversionError(f"{directory}/{VARIABLES_DIR} does not match {ARCH_FILE} "
                          f"({'unreadable metadata' if saved is None else differ}); convert "
                          "the teacher again.")
  try:
    variables = _checkpointer().restore(directory / VARIABLES_DIR, target)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{directory}/{VARIABLES_DIR} does not match "
                          f"{ARCH_FILE}: {e}") from e
  return build_edm(arch, dtype, attention), variables


def file_sha256(path: PathLike) -> str:
  """SHA-256 of a file's bytes (hex), read in 16 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(16 * 2**20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def teacher_identity(path: PathLike) -> dict:
  """What identifies a teacher file or converted directory across runs.

  `sha256` is the content hash of the teacher file; for a directory written
  by `convert`, the hash of the file it was converted from (`source.json`), so
  a snapshot and its conversion are the same teacher. A directory without
  that record is identified by the hash of all its files.
  """
  path = pathlib.Path(path).absolute()
  if path.is_file():
    return {"kind": "edm", "path": str(path), "sha256": file_sha256(path)}
  source = path / SOURCE_FILE
  if source.is_file() and source.stat().st_size < MAX_ARCH_BYTES:
    try:
      recorded = limits.json_load(source)
      if isinstance(recorded, dict) and isinstance(recorded.get("sha256"), str):
        return {"kind": "edm", "path": str(path), "sha256": recorded["sha256"]}
    except ValueError:
      pass
  digest = hashlib.sha256()
  for file in sorted(p for p in path.rglob("*") if p.is_file()):
    digest.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
  return {"kind": "edm", "path": str(path), "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------
# Public entry points.


def load_edm(path: PathLike, dtype=jnp.float32,
             arch: Optional[Union[PathLike, Mapping[str, Any]]] = None):
  """Loads an EDM teacher as `(module, variables)` for `module.apply`.

  Args:
    path: a `.pkl` snapshot, a directory written by `convert`, or a state dict
      (`.npz`, `.pt`, `.pth`, `.safetensors`) together with `arch`.
    dtype: compute dtype of the U-Net (`build_edm`); parameters stay float32.
    arch: EDMPrecond kwargs (mapping or JSON path) for state-dict inputs.

  Returns:
    (EDMPrecond module, variables): `module.apply(variables, x_nhwc, sigma,
    class_labels)` is EDM's denoiser D(x; sigma) (Karras et al. 2022, Eq. 7).
  """
  if pathlib.Path(path).is_dir():
    return load_converted(path, dtype)
  arch, state_dict = read_teacher(path, arch)
  variables = teacher_variables(arch, state_dict, path)
  return build_edm(arch, dtype), variables


def convert(input_path: PathLike, output: PathLike,
            arch: Optional[Union[PathLike, Mapping[str, Any]]] = None,
            overwrite: bool = False) -> pathlib.Path:
  """Converts a teacher file into `output/arch.json` + `output/variables`.

  Everything is read and checked before anything is written; the output
  appears only complete (temporary directory renamed at the end).
  """
  try:
    atomic.check_output_dir(os.path.abspath(output), overwrite)
    atomic.check_not_inside(output, [input_path] + ([arch] if isinstance(arch, (str, os.PathLike))
                                                    else []), "the input")
  except atomic.OutputError as e:
    raise ConversionError(str(e)) from e
  arch, state_dict = read_teacher(input_path, arch)
  variables = teacher_variables(arch, state_dict, input_path)
  source = {"input": os.path.basename(os.fspath(input_path)), "sha256": file_sha256(input_path)}
  return save_converted(output, arch, variables, overwrite, source)
