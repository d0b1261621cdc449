"""Tests for fdistill_jax.loaders.safe_pickle: allow-listed unpickling, torch archives.

References are torch itself (the tensors that were saved, `torch.load`) and
plain pickle round trips; malicious pickles are checked to run nothing by
looking for the marker files they would create.
"""

import builtins
import collections
import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fdistill_jax.loaders import safe_pickle  # noqa: E402


class Reduce:
  """Pickles as `func(*args)`: how a hostile pickle calls a global."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


@contextlib.contextmanager
def stand_in_persistence():
  """`torch_utils.persistence` with a reconstructor that must never run."""
  def _reconstruct_persistent_obj(meta):
    raise AssertionError("stand-in reconstructor ran")

  pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
  _reconstruct_persistent_obj.__module__ = mod.__name__
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
  pkg.persistence = mod
  assert pkg.__name__ not in sys.modules
  sys.modules.update({pkg.__name__: pkg, mod.__name__: mod})
  try:
    yield _reconstruct_persistent_obj
  finally:
    del sys.modules[pkg.__name__], sys.modules[mod.__name__]


def persistent(reconstruct, class_name, state, module_src="pass"):
  meta = dict(type="class", version=6, module_src=module_src, class_name=class_name,
              state=state)
  return Reduce(reconstruct, meta)


def sample_tensors():
  torch.manual_seed(0)
  base = torch.randn(4, 6)
  return {
      "f32": torch.randn(3, 5), "f64": torch.randn(2, dtype=torch.float64),
      "f16": torch.randn(7).half(), "bf16": torch.randn(4).bfloat16(),
      "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
      "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]),
      "slice": base[1:, 2:5], "transposed": base.t(), "empty": torch.zeros(0, 3),
      "scalar": torch.tensor(2.5), "param": torch.nn.Parameter(torch.randn(2, 2)),
  }


def as_numpy(t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def assert_matches_torch(loaded, tensors):
  assert sorted(loaded) == sorted(tensors)
  for k, t in tensors.items():
    ref = as_numpy(t)
    got = np.asarray(loaded[k], ref.dtype)
    assert got.shape == ref.shape, k
    np.testing.assert_array_equal(got, ref)  # exact: same bits, no arithmetic


# --------------------------------------------------------------------------
# Tensors, archives, containers.


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickled_tensors(protocol):
  tensors = sample_tensors()
  assert_matches_torch(safe_pickle.safe_loads(pickle.dumps(tensors, protocol)), tensors)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_archives(tmp_path, zip_format):
  tensors = sample_tensors()
  path = tmp_path / "t.pt"
  torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
  assert_matches_torch(safe_pickle.load_torch(path), tensors)
  assert_matches_torch(safe_pickle.load_torch(path.read_bytes()), tensors)
  if zip_format:
    assert_matches_torch(safe_pickle.load_torch_zip(path), tensors)
    # torch's own restricted loader agrees.
    assert_matches_torch(safe_pickle.load_torch_zip(path), torch.load(path, weights_only=True))


def test_module_records_and_state_dict():
  net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ModuleDict(
      {"a": torch.nn.GroupNorm(2, 4), "b": torch.nn.ModuleList([torch.nn.Linear(4, 2)])}))
  net.register_buffer("kept", torch.ones(2))
  net.register_buffer("dropped", torch.zeros(2), persistent=False)
  data = pickle.dumps(net)
  with pytest.raises(safe_pickle.ForbiddenGlobalError, match="torch.nn.modules.linear.Linear"):
    safe_pickle.safe_loads(data)
  extra = {(m, n): safe_pickle.record_class(m, n) for m, n in [
      ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.normalization", "GroupNorm")]}
  record = safe_pickle.safe_loads(data, extra_allowed=extra)
  ref = net.state_dict()
  got = safe_pickle.module_state_dict(record)
  assert list(got) == list(ref)  # same names, same order as torch
  assert_matches_torch(got, ref)


def test_plain_python_and_numpy_values():
  value = {"od": collections.OrderedDict(a=1), "set": {1, 2}, "fs": frozenset("ab"),
           "arr": np.arange(6.0).reshape(2, 3), "f32": np.float32(1.5), "i8": np.int8(-3),
           "dtype": np.dtype("<f2"), "nested": [(1, 2.0, "x", b"y", None, True)]}
  for protocol in (0, 2, 4, 5):
    got = safe_pickle.safe_loads(pickle.dumps(value, protocol))
    assert got.keys() == value.keys()
    for k in value:
      if isinstance(value[k], np.ndarray):
        np.testing.assert_array_equal(got[k], value[k])
      else:
        assert got[k] == value[k] and type(got[k]) is type(value[k]), (protocol, k)


def test_persistent_object_is_recorded_not_executed(tmp_path):
  marker = tmp_path / "MARKER"
  src = f"open({str(marker)!r}, 'w').write('module_src ran')\n"
  with stand_in_persistence() as reconstruct:
    data = pickle.dumps({"ema": persistent(reconstruct, "EDMPrecond", {
        "_init_args": (), "_init_kwargs": {"model_type": "SongUNet", "label_dim": 10},
        "_parameters": {}, "_buffers": {}, "_modules": {}}, module_src=src)})
  obj = safe_pickle.safe_loads(data)["ema"]
  assert isinstance(obj, safe_pickle.PersistentObject)
  assert obj.class_name == "EDMPrecond" and obj.version == 6
  assert obj.init_kwargs == {"model_type": "SongUNet", "label_dim": 10}
  assert "torch_utils" not in sys.modules  # the loader imported nothing
  assert not marker.exists()


# --------------------------------------------------------------------------
# Hostile pickles.


def hostile_payloads(marker):
  m = str(marker)
  return [
      (Reduce(os.system, f"touch {m}"), f"{os.system.__module__}.system"),
      (Reduce(builtins.eval, f"open({m!r}, 'w')"), "builtins.eval"),
      (Reduce(builtins.exec, f"open({m!r}, 'w')"), "builtins.exec"),
      (Reduce(subprocess.Popen, ["touch", m]), "subprocess.Popen"),
      (Reduce(getattr, Reduce(builtins.__import__, "os"), "system"), "builtins.getattr"),
  ]


@pytest.mark.parametrize("index", range(5))
def test_hostile_globals_are_refused(tmp_path, index):
  marker = tmp_path / "MARKER"
  payload, name = hostile_payloads(marker)[index]
  with stand_in_persistence() as reconstruct:
    leaf = persistent(reconstruct, "Conv2d", {"_parameters": {"weight": payload}})
    deep = persistent(reconstruct, "EDMPrecond", {
        "_modules": collections.OrderedDict(model=persistent(reconstruct, "SongUNet", {
            "_modules": {"enc": [leaf]}}))})
    snapshot = pickle.dumps({"ema": deep, "dataset_kwargs": {}})
  for data in (pickle.dumps(payload, 2), snapshot):
    with pytest.raises(safe_pickle.ForbiddenGlobalError, match=name.replace(".", r"\.")) as e:
      safe_pickle.safe_loads(data)
    assert isinstance(e.value, pickle.UnpicklingError)
  assert not marker.exists()


def test_hostile_payload_inside_torch_storage_and_archive(tmp_path):
  marker = tmp_path / "MARKER"
  payload = Reduce(os.system, f"touch {marker}")
  # A storage whose torch.save bytes hold a hostile pickle instead.
  fake_storage = Reduce(torch.storage._load_from_bytes, pickle.dumps(payload, 2))
  with pytest.raises(safe_pickle.ForbiddenGlobalError, match="system"):
    safe_pickle.safe_loads(pickle.dumps({"w": fake_storage}))
  path = tmp_path / "evil.pt"
  torch.save({"w": torch.ones(2), "x": payload}, path)
  with pytest.raises(safe_pickle.ForbiddenGlobalError, match="system"):
    safe_pickle.load_torch(path)
  assert not marker.exists()


def test_out_of_bounds_tensor_and_truncation_are_errors(tmp_path):
  storage = torch.ones(3).untyped_storage()
  bad = Reduce(torch._utils._rebuild_tensor_v2, torch.storage.TypedStorage(
      wrap_storage=storage, dtype=torch.float32, _internal=True), 0, (100,), (1,), False,
      collections.OrderedDict())
  with pytest.raises(safe_pickle.TorchFormatError, match="past its storage"):
    safe_pickle.safe_loads(pickle.dumps(bad))
  data = pickle.dumps(sample_tensors())
  with pytest.raises(pickle.UnpicklingError, match="truncated"):
    safe_pickle.safe_loads(data[:len(data) // 2])
  for zip_format in (True, False):
    buf = io.BytesIO()
    torch.save(sample_tensors(), buf, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError):
      safe_pickle.load_torch(buf.getvalue()[:len(buf.getvalue()) - 40])


def test_works_without_torch(tmp_path):
  """load_torch / safe_load need only numpy: torch made unimportable."""
  tensors = sample_tensors()
  torch.save(tensors, tmp_path / "z.pt")
  torch.save(tensors, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
  (tmp_path / "p.pkl").write_bytes(pickle.dumps(tensors))
  code = (
      "import sys, numpy as np\n"
      "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
      "from fdistill_jax.loaders import safe_pickle as sp\n"
      "d = sys.argv[1]\n"
      "out = {'z': sp.load_torch(d + '/z.pt'), 'l': sp.load_torch(d + '/l.pt'),\n"
      "       'p': sp.safe_load(open(d + '/p.pkl', 'rb'))}\n"
      "np.savez(d + '/out.npz', **{f'{a}/{k}': np.asarray(v, np.float64)\n"
      "                            for a, t in out.items() for k, v in t.items()})\n")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
  got = np.load(tmp_path / "out.npz")
  for fmt in ("z", "l", "p"):
    assert_matches_torch({k: got[f"{fmt}/{k}"] for k in tensors}, tensors)


# --------------------------------------------------------------------------
# The allow-list audit (issue 12): what each entry's arguments can make it do.
# (The attacks that would allocate gigabytes run in a memory-limited subprocess in
# tests/test_hostile_files.py; these are the small ones.)


def test_big_endian_arrays_load_and_numpy_singletons_stay_untouched():
  native = np.dtype("f4")
  value = {"be": np.arange(3, dtype=">f4"), "le": np.arange(3, dtype="<i8"),
           "dtype": np.dtype(">f4")}
  for protocol in (2, 5):
    data = pickle.dumps(value, protocol)
    got, ref = safe_pickle.safe_loads(data), pickle.loads(data)   # numpy's own reading
    assert got["dtype"] == ref["dtype"] == np.dtype(">f4")
    for k in ("be", "le"):
      np.testing.assert_array_equal(got[k], ref[k])
      assert got[k].dtype == ref[k].dtype
  assert np.dtype("f4") is native and native.byteorder == "="


@pytest.mark.parametrize("payload, message", [
    (Reduce(set, np.arange(5)), "set from a ndarray refused"),
    (Reduce(frozenset, np.arange(5)), "frozenset from a ndarray refused"),
    (Reduce(collections.OrderedDict, np.zeros((3, 2))), "OrderedDict from a ndarray refused"),
    (Reduce(torch.Size, [2, "x"]), "torch.Size"),
    (Reduce(torch.device, [["cuda"]]), "torch.device"),
    (Reduce(np.dtype, "O8"), "numpy dtype 'O8' refused"),
    (Reduce(np.dtype, "f4,f4"), "numpy dtype 'f4,f4' refused"),
    (Reduce(np.dtype, "(1000000,)f4"), "refused"),
    (Reduce(torch._tensor._rebuild_from_type_v2, set, None, ([1],), None),
     "_rebuild_from_type_v2"),
])
def test_allow_listed_callables_refuse_dangerous_arguments(payload, message):
  with pytest.raises(pickle.UnpicklingError, match=message.replace("(", r"\(").replace(")", r"\)")):
    safe_pickle.safe_loads(pickle.dumps(payload, 2))


def test_build_is_refused_on_anything_but_records_arrays_dtypes_and_dicts():
  """BUILD on an allow-listed function, or slot state on a dict, would change shared objects."""
  from tests import hostile_files as hf  # pylint: disable=g-import-not-at-top
  od = hf.call(hf.g("collections", "OrderedDict"), )
  for data in (hf.PROTO2 + hf.g("builtins", "set") + hf.d() + hf.BUILD + hf.STOP,
               hf.PROTO2 + hf.g("dnnlib", "EasyDict") + hf.d() + hf.BUILD + hf.STOP,
               hf.PROTO2 + od + hf.tup(hf.NONE, hf.d((hf.s("x"), hf.i(1)))) + hf.BUILD
               + hf.STOP):
    with pytest.raises(pickle.UnpicklingError, match="setting the state of a"):
      safe_pickle.safe_loads(data)
  assert not hasattr(safe_pickle.EasyDict, "x")


def test_protocol5_buffer_must_match_its_shape():
  data = pickle.dumps(np.arange(4.0), 5)
  assert data.count(b"\x96") == 1                    # BYTEARRAY8 of 32 bytes
  bad = data.replace(b"K\x04\x85", b"K\x05\x85")     # shape (4,) -> (5,)
  with pytest.raises(pickle.UnpicklingError, match="needs 40 bytes, the buffer has 32"):
    safe_pickle.safe_loads(bad)


def test_shared_submodule_is_refused():
  """A module reachable by two paths (a DAG) is refused, not walked twice (exponential)."""
  leaf = torch.nn.Module()
  leaf.register_parameter("w", torch.nn.Parameter(torch.ones(1)))
  top = torch.nn.Module()
  top.add_module("a", leaf)
  top.add_module("b", leaf)
  record = safe_pickle.safe_loads(pickle.dumps(top), extra_allowed={})
  with pytest.raises(ValueError, match="'b' appears twice in the module tree"):
    safe_pickle.module_state_dict(record)


def test_every_allow_listed_global_is_documented():
  doc = safe_pickle.__doc__
  allowed = safe_pickle.allowed_globals()
  assert ("numpy", "dtype") in allowed and ("torch._utils", "_rebuild_tensor_v2") in allowed
  for module, name in allowed:
    if module == "torch" and (name in safe_pickle._TORCH_DTYPES or name.endswith("Storage")):
      documented = "torch.*Storage, torch.<dtype>" in doc
    else:
      documented = f"{module}.*" in doc or re.search(rf"\b{re.escape(name)}\b", doc)
    assert documented, f"{module}.{name} is allow-listed but not in the table of the docstring"
