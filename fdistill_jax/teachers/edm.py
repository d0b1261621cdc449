"""EDM teacher -> Flax: read official snapshots safely, write orbax checkpoints.

Inputs (`read_teacher`):

* `.pkl`: an EDM network snapshot (NVlabs/edm `training/training_loop.py`
  pickles `dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`).
  It is read with `fdistill_jax.safe_pickle` (allow-list, no torch, the
  pickled source code is never executed). The architecture is the init
  arguments EDM recorded for the `EDMPrecond` object (`_init_kwargs`).
* `.npz`, `.pt`/`.pth` (a `torch.save`d state dict, read without torch) or
  `.safetensors`: an `EDMPrecond.state_dict()` plus an architecture JSON
  (EDMPrecond kwargs, like the fixtures' `*_config.json`).
* a directory written by `convert`: `arch.json` + `variables/` (orbax).

Command line:

  python -m fdistill_jax.convert --input edm-cifar10-32x32-cond-vp.pkl \\
      --output teachers/cifar10

Then `module, variables = load_edm("teachers/cifar10")` and
`module.apply(variables, x_nhwc, sigma, one_hot_labels)`.
"""

import argparse
import json
import os
import pathlib
import pickle
import shutil
import sys
import uuid
import zipfile
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from fdistill_jax import safe_pickle

PathLike = Union[str, os.PathLike]
ARCH_FILE = "arch.json"
VARIABLES_DIR = "variables"
SUPPORTED_PRECONDS = ("EDMPrecond",)
# EDMPrecond's positional parameters, to name any recorded `_init_args`.
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16",
                       "sigma_min", "sigma_max", "sigma_data", "model_type")


class ConversionError(ValueError):
  """The input is not a usable EDM teacher, or the output cannot be written."""


# --------------------------------------------------------------------------
# Architecture arguments.


def _jsonable(value, where: str):
  """Plain JSON types from recorded init arguments (tuples -> lists)."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, where) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v, where) for k, v in value.items()}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise ConversionError(f"{where}: init argument of type {type(value).__name__} "
                        "cannot be stored as architecture JSON.")


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
  return _jsonable(arch, net.class_name)


def read_arch(arch: Union[PathLike, Mapping[str, Any]]) -> dict:
  """Architecture from a mapping or a JSON file (EDMPrecond kwargs)."""
  if isinstance(arch, Mapping):
    return dict(arch)
  path = pathlib.Path(arch)
  if not path.is_file():
    raise FileNotFoundError(f"architecture JSON {path} does not exist.")
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"architecture file {path} is not valid JSON: {e}") from e
  if not isinstance(value, dict) or "img_resolution" not in value:
    raise ConversionError(
        f"architecture file {path} must hold a JSON object of EDMPrecond "
        "kwargs (img_resolution, img_channels, label_dim, model_type, ...).")
  return value


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


def _read_npz(path) -> dict:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f"cannot read {path} as .npz: {e}") from e


def _read_torch(path):
  """A `torch.save` file read by safe_pickle (torch is not needed)."""
  return safe_pickle.load_torch(path)


def _read_safetensors(path) -> dict:
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"reading {path} needs the 'safetensors' package: "
                          "pip install safetensors.") from e
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise ConversionError(f"cannot read {path} as .safetensors: {e}") from e


STATE_DICT_READERS = {".npz": _read_npz, ".pt": _read_torch, ".pth": _read_torch,
                      ".safetensors": _read_safetensors}


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
  if suffix not in STATE_DICT_READERS:
    raise ConversionError(
        f"{path}: unknown teacher format {suffix!r}; expected .pkl (EDM snapshot)"
        f", a converted directory, or one of {sorted(STATE_DICT_READERS)} + --arch.")
  obj = STATE_DICT_READERS[suffix](path)
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
  """Flax variables for `build_edm(arch)`; name/shape mismatches get context."""
  from fdistill_jax import networks  # pylint: disable=g-import-not-at-top
  try:
    return networks.variables_from_state_dict(arch, state_dict)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e


# --------------------------------------------------------------------------
# Converted directories.


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer()


def _is_nonempty_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any(path.iterdir())


def _check_output(output: pathlib.Path, overwrite: bool) -> None:
  if output.exists() and not output.is_dir():
    raise ConversionError(f"output {output} exists and is not a directory.")
  if _is_nonempty_dir(output) and not overwrite:
    raise ConversionError(f"output directory {output} exists and is not empty: "
                          "choose another --output or pass --overwrite.")


def save_converted(output: PathLike, arch: Mapping[str, Any], variables,
                   overwrite: bool = False) -> pathlib.Path:
  """Writes `arch.json` + orbax `variables/` atomically (temp dir, rename)."""
  output = pathlib.Path(output).absolute()
  _check_output(output, overwrite)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    (tmp / ARCH_FILE).write_text(json.dumps(dict(arch), indent=1, sort_keys=True))
    checkpointer = _checkpointer()
    checkpointer.save(tmp / VARIABLES_DIR, variables)
    checkpointer.wait_until_finished()
    _check_output(output, overwrite)
    _replace_dir(tmp, output)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return output


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Renames `src` to `dst`, moving an existing `dst` aside first."""
  old = None
  if _is_nonempty_dir(dst):
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    dst.rename(old)
  elif dst.is_dir():
    dst.rmdir()
  src.rename(dst)
  if old is not None:
    shutil.rmtree(old)


def load_converted(directory: PathLike, dtype=jnp.float32):
  """(module, variables) from a directory written by `convert`."""
  from fdistill_jax import networks  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory).absolute()
  if not (directory / ARCH_FILE).is_file() or not (directory / VARIABLES_DIR).is_dir():
    raise ConversionError(f"{directory} is not a converted teacher: expected "
                          f"{ARCH_FILE} and {VARIABLES_DIR}/ (run "
                          "python -m fdistill_jax.convert first).")
  arch = read_arch(directory / ARCH_FILE)
  target = networks.variable_shapes(arch)
  try:
    variables = _checkpointer().restore(directory / VARIABLES_DIR, target)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{directory}/{VARIABLES_DIR} does not match "
                          f"{ARCH_FILE}: {e}") from e
  return networks.build_edm(arch, dtype), variables


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
  from fdistill_jax import networks  # pylint: disable=g-import-not-at-top
  if pathlib.Path(path).is_dir():
    return load_converted(path, dtype)
  arch, state_dict = read_teacher(path, arch)
  variables = teacher_variables(arch, state_dict, path)
  return networks.build_edm(arch, dtype), variables


def convert(input_path: PathLike, output: PathLike,
            arch: Optional[Union[PathLike, Mapping[str, Any]]] = None,
            overwrite: bool = False) -> pathlib.Path:
  """Converts a teacher file into `output/arch.json` + `output/variables`.

  Everything is read and checked before anything is written; the output
  appears only complete (temporary directory renamed at the end).
  """
  _check_output(pathlib.Path(output), overwrite)
  arch, state_dict = read_teacher(input_path, arch)
  variables = teacher_variables(arch, state_dict, input_path)
  return save_converted(output, arch, variables, overwrite)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m fdistill_jax.convert",
      description="Convert an EDM teacher (.pkl snapshot, or a state dict with "
      "--arch) into an orbax checkpoint + arch.json, without executing it.")
  parser.add_argument("--input", required=True, help="teacher file")
  parser.add_argument("--output", required=True, help="directory to write")
  parser.add_argument("--arch", help="architecture JSON for state-dict inputs")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --output directory")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse_args(argv)
  try:
    out = convert(args.input, args.output, args.arch, args.overwrite)
  except (ConversionError, FileNotFoundError, pickle.UnpicklingError) as e:
    print(f"convert: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
