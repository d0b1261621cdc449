"""Tests for fdistill_jax.loaders.edm (and tools.convert): EDM snapshots and state dicts -> Flax teacher.

The snapshot is written here the way EDM's training loop writes one
(`pickle.dump(dict(ema=net, ...))` with persistent-class objects reduced to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`), holding real
torch tensors with the fixture weights; the reference for the loaded teacher
is the fixture output of the PyTorch EDMPrecond.
"""

import contextlib
import json
import pickle
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fdistill_jax.loaders import edm as convert  # noqa: E402  (the converter)
from fdistill_jax.loaders.edm_variables import variables_from_state_dict

NAME = "songunet_tiny"
MODULE_SRC_TEMPLATE = "import pathlib\npathlib.Path({marker!r}).write_text('module_src ran')\n"


# --------------------------------------------------------------------------
# A synthetic EDM snapshot.


@contextlib.contextmanager
def stand_in_persistence(marker):
  """A `torch_utils.persistence` module whose reconstructor leaves a marker."""
  def _reconstruct_persistent_obj(meta):
    with open(marker, "w") as f:
      f.write("reconstructor ran")
    raise RuntimeError("stand-in reconstructor must never run")

  pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
  _reconstruct_persistent_obj.__module__ = mod.__name__
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
  pkg.persistence = mod
  saved = {k: sys.modules.get(k) for k in (pkg.__name__, mod.__name__)}
  sys.modules.update({pkg.__name__: pkg, mod.__name__: mod})
  try:
    yield _reconstruct_persistent_obj
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def persistent_mixin(class_name, reconstruct, module_src):
  """Reduces like EDM's persistent_class decorator (meta dict + state)."""
  class Persistent:
    def __reduce__(self):
      fields = list(super().__reduce__())  # (reconstructor, args, __dict__)
      meta = dict(type="class", version=6, module_src=module_src,
                  class_name=class_name, state=fields[2])
      return (reconstruct, (meta,), None)
  return Persistent


def build_torch_net(weights, config, reconstruct, module_src):
  """An EDMPrecond-like torch module tree holding `weights` as parameters."""
  def make(class_name):
    base = persistent_mixin(class_name, reconstruct, module_src)
    return type(class_name, (base, torch.nn.Module), {})()

  top = make("EDMPrecond")
  for name, value in weights.items():
    node, parts = top, name.split(".")
    for part in parts[:-1]:
      if part not in node._modules:
        child = (torch.nn.ModuleDict() if part in ("enc", "dec") else
                 make("SongUNet" if part == "model" else "Layer"))
        node.add_module(part, child)
      node = node._modules[part]
    tensor = torch.from_numpy(np.array(value))
    if parts[-1] == "resample_filter":
      node.register_buffer(parts[-1], tensor)
    else:
      node.register_parameter(parts[-1], torch.nn.Parameter(tensor))
  top.model.register_buffer("scratch", torch.ones(3), persistent=False)
  kwargs = {k: v for k, v in config.items() if k != "precond"}
  kwargs["use_fp16"] = False
  top.__dict__.update(img_resolution=config["img_resolution"], sigma_data=0.5,
                      _init_args=(), _init_kwargs=kwargs)
  return top.eval().requires_grad_(False)


def write_snapshot(path, weights, config, marker):
  with stand_in_persistence(marker) as reconstruct:
    src = MODULE_SRC_TEMPLATE.format(marker=str(marker))
    net = build_torch_net(weights, config, reconstruct, src)
    loss = type("EDMLoss", (persistent_mixin("EDMLoss", reconstruct, src),), {})()
    loss.__dict__.update(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    data = dict(ema=net, loss_fn=loss, augment_pipe=None,
                dataset_kwargs=dict(path="cifar10-32x32.zip", use_labels=True, xflip=False))
    with open(path, "wb") as f:
      pickle.dump(data, f)


@pytest.fixture(scope="module")
def fixture_data(edm_fixtures):
  weights = dict(np.load(edm_fixtures / f"{NAME}_weights.npz"))
  config = json.loads((edm_fixtures / f"{NAME}_config.json").read_text())
  return weights, config, dict(np.load(edm_fixtures / f"{NAME}_io.npz"))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, fixture_data):
  root = tmp_path_factory.mktemp("snapshot")
  marker = root / "MARKER"
  write_snapshot(root / "network-snapshot.pkl", fixture_data[0], fixture_data[1], marker)
  return root / "network-snapshot.pkl", marker


@pytest.fixture(scope="module")
def npz_variables(fixture_data):
  """Reference conversion: the fixture npz through the networks converter."""
  return variables_from_state_dict(fixture_data[1], fixture_data[0])


def assert_same_weights(state_dict, weights):
  assert sorted(state_dict) == sorted(weights)
  for k, v in weights.items():
    np.testing.assert_array_equal(state_dict[k], v)  # bit-exact float32 copies


def assert_same_tree(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # exact copies


def denoise(module, variables, io):
  x = np.transpose(io["x_nchw"], (0, 2, 3, 1))
  out = jax.jit(module.apply)(variables, x, io["sigma"], io.get("class_labels"))
  return np.transpose(np.asarray(out), (0, 3, 1, 2))


# --------------------------------------------------------------------------
# Snapshots.


def test_read_snapshot_gives_recorded_arch_and_state_dict(snapshot, fixture_data):
  path, marker = snapshot
  arch, state_dict = convert.read_snapshot(path)
  weights, config, _ = fixture_data
  assert arch == {**config, "use_fp16": False}  # the recorded _init_kwargs
  assert_same_weights(state_dict, weights)  # non-persistent 'scratch' dropped
  assert not marker.exists()


def test_snapshot_and_converted_dir_reproduce_edm(snapshot, fixture_data, tmp_path):
  path, marker = snapshot
  module, variables = convert.load_edm(path)
  out = tmp_path / "teacher"
  result = subprocess.run([sys.executable, "-m", "fdistill_jax.tools.convert",
                           f"--input={path}", f"--output={out}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((out / "arch.json").read_text())["model_type"] == "SongUNet"
  module2, variables2 = convert.load_edm(out)
  assert_same_tree(variables, variables2)
  assert module2 == module
  io = fixture_data[2]
  got = denoise(module2, variables2, io)
  ref = io["denoised_nchw"]
  # Tolerance 1e-5 relative to the output scale: float32 PyTorch vs XLA CPU.
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  assert not marker.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temp dirs left
  assert (out / ".fdistill_output").is_file()


def test_snapshot_loads_without_torch(snapshot, fixture_data, tmp_path):
  """The loader needs neither torch nor torch_utils; same arrays as the fixture."""
  path, marker = snapshot
  out = tmp_path / "arrays.npz"
  code = (
      "import sys, numpy as np\n"
      "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
      "from fdistill_jax.loaders import safe_pickle\n"
      f"obj = safe_pickle.safe_load(open({str(path)!r}, 'rb'))\n"
      "np.savez(sys.argv[1], **safe_pickle.module_state_dict(obj['ema']))\n"
      "assert 'torch_utils' not in sys.modules and sys.modules['torch'] is None\n")
  subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
  assert_same_weights(dict(np.load(out)), fixture_data[0])
  assert not marker.exists()


# --------------------------------------------------------------------------
# State dicts + arch JSON.


@pytest.fixture
def arch_json(tmp_path, fixture_data):
  path = tmp_path / "arch.json"
  path.write_text(json.dumps(fixture_data[1]))
  return path


def test_state_dict_formats_match(tmp_path, fixture_data, arch_json, npz_variables,
                                  edm_fixtures):
  weights, config, _ = fixture_data
  pt = tmp_path / "sd.pt"
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, pt)
  # Independent reading of the same file by torch itself.
  ref = torch.load(pt, weights_only=True)
  for k in weights:
    np.testing.assert_array_equal(ref[k].numpy(), weights[k])
  from safetensors.numpy import save_file
  st = tmp_path / "sd.safetensors"
  save_file(weights, str(st))
  wrapped = tmp_path / "wrapped.pth"
  torch.save({"ema": {k: torch.from_numpy(v) for k, v in weights.items()}}, wrapped)
  for path in (edm_fixtures / f"{NAME}_weights.npz", pt, st, wrapped):
    arch, state_dict = convert.read_teacher(path, arch=arch_json)
    assert arch == config
    assert_same_weights(state_dict, weights)
  # EDM's training-state-*.pt: torch.save(dict(net=net, optimizer_state=...)).
  state = tmp_path / "training-state.pt"
  with stand_in_persistence(tmp_path / "MARKER") as reconstruct:
    net = build_torch_net(weights, config, reconstruct, "raise SystemExit")
    torch.save(dict(net=net, optimizer_state={"step": torch.tensor(3)}), state)
  arch, state_dict = convert.read_teacher(state)
  assert arch == {**config, "use_fp16": False}  # recorded _init_kwargs
  assert_same_weights(state_dict, weights)
  out = tmp_path / "from_pt"
  convert.convert(pt, out, arch=arch_json)
  assert_same_tree(convert.load_edm(out)[1], npz_variables)


# --------------------------------------------------------------------------
# Bad inputs: clear errors and nothing written.


def _bad_inputs(tmp_path, snapshot, fixture_data):
  weights, config, _ = fixture_data
  full = snapshot[0].read_bytes()
  (tmp_path / "trunc.pkl").write_bytes(full[:len(full) // 2])
  (tmp_path / "noema.pkl").write_bytes(pickle.dumps({"net_state": {"a": np.ones(2)}}))
  bad = dict(weights)
  del bad["model.map_layer0.bias"]
  bad["model.map_label.weight"] = bad["model.map_label.weight"][:, :3]
  np.savez(tmp_path / "mismatch.npz", **bad)
  np.savez(tmp_path / "good.npz", **weights)
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "sd.pt")
  (tmp_path / "trunc.pt").write_bytes((tmp_path / "sd.pt").read_bytes()[:5000])
  (tmp_path / "arch.json").write_text(json.dumps(config))
  (tmp_path / "wide.json").write_text(json.dumps({**config, "model_channels": 16}))
  arch, wide = str(tmp_path / "arch.json"), str(tmp_path / "wide.json")
  return [  # (input, arch, expected exception, text the message must contain)
      ("missing.pkl", None, FileNotFoundError, "does not exist"),
      ("trunc.pkl", None, pickle.UnpicklingError, "truncated"),
      ("trunc.pt", arch, pickle.UnpicklingError, "truncated"),
      ("noema.pkl", None, convert.ConversionError, "expected a dict with key 'ema'"),
      ("mismatch.npz", arch, convert.ConversionError, "model.map_layer0.bias"),
      ("mismatch.npz", arch, convert.ConversionError, "model.map_label.weight"),
      ("good.npz", wide, convert.ConversionError, "does not match the architecture"),
      ("good.npz", None, convert.ConversionError, "--arch"),
      ("good.npz", str(tmp_path / "nope.json"), FileNotFoundError, "nope.json"),
  ]


def test_bad_inputs_raise_and_write_nothing(tmp_path, snapshot, fixture_data):
  cases = _bad_inputs(tmp_path, snapshot, fixture_data)
  before = sorted(p.name for p in tmp_path.iterdir())
  for name, arch, error, text in cases:
    with pytest.raises(error) as info:
      convert.convert(tmp_path / name, tmp_path / "out", arch=arch)
    assert text in str(info.value), (name, str(info.value))
    if error is not convert.ConversionError:  # (the same path; skips a trace)
      with pytest.raises(error):
        convert.load_edm(tmp_path / name, arch=arch)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, name


def test_output_dir_refused_unless_overwrite_and_written_by_us(tmp_path, snapshot):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(convert.ConversionError, match="not empty.*--overwrite"):
    convert.convert(snapshot[0], out)
  # --overwrite never replaces a folder this tool did not write.
  with pytest.raises(convert.ConversionError, match="not written by fdistill_jax"):
    convert.convert(snapshot[0], out, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
  ours = tmp_path / "ours"
  convert.convert(snapshot[0], ours)
  convert.convert(snapshot[0], ours, overwrite=True)
  assert sorted(p.name for p in ours.iterdir()) == [".fdistill_output", "arch.json", "source.json",
                                                    "variables"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]


def test_cli_subprocess_reports_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "fdistill_jax.tools.convert", f"--input={tmp_path / 'x.pkl'}",
       f"--output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "convert: error: teacher file" in result.stderr
  assert "x.pkl does not exist" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  class BrokenCheckpointer:
    def save(self, path, tree):
      (path / "partial").mkdir(parents=True)
      raise OSError("disk full")

  monkeypatch.setattr(convert, "_checkpointer", BrokenCheckpointer)
  with pytest.raises(OSError, match="disk full"):
    convert.save_converted(tmp_path / "out", {"img_resolution": 8}, {"params": {}})
  assert list(tmp_path.iterdir()) == []
