"""Sampling and export: weights read back exactly, reproducible per-sample noise,
output files, the teacher's Heun path, and errors.

The runs are tiny (the toy config with 2x32 MLPs; the 8x8 DDPM++ of
configs/tiny.py for one step) so that compilation, which dominates, stays short.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import tiny
from fdistill_jax import plugins
from fdistill_jax.models.mlp import ToyDenoiser
from fdistill_jax.models.edm import build_edm
from fdistill_jax.loaders.edm_variables import variable_shapes
from fdistill_jax.data import pixels
from fdistill_jax.pipelines import edm_sampler
from fdistill_jax.pipelines import sampling
from fdistill_jax.loaders import edm
from fdistill_jax.tools import cli
from fdistill_jax.tools import sample
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop
from fdistill_jax.train import state as state_lib
from tests.helpers import small_toy

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


def load_generator(directory, **kwargs):
  """`checkpoint.load_generator` with the modules of every problem."""
  return ckpt_lib.load_generator(directory, student_from_spec=REGISTRY.student_from_spec,
                                 **kwargs)


def run_sample(args):
  """`python -m fdistill_jax.tools.sample ARGS` in this process: the exit code."""
  return cli.invoke(sample.main, "sample", sample.FLAGS, args)


def random_teacher(seed=0):
  """The tiny config's 8x8 DDPM++ with numpy random weights (fast; no jitted init)."""
  arch = tiny.get_config("js").teacher.arch.to_dict()
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    if len(leaf.shape) >= 2:
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return rng.normal(0, 0.05, size=leaf.shape)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, l: jnp.asarray(draw(p, l), jnp.float32), variable_shapes(arch))
  return arch, build_edm(arch), variables


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A 2-step toy run checkpointed at the end; returns (workdir, final TrainState)."""
  workdir = str(tmp_path_factory.mktemp("toy_run"))
  state = loop.train_and_evaluate(small_toy("js", total_steps=2), workdir, registry=REGISTRY)
  return workdir, jax.device_get(state)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  """A workdir of the 8x8 DDPM++ run holding a TrainState saved by the run's checkpoint writer.

  Compiling the image network's init and train steps takes a minute on a loaded
  2-core CI machine, so the state is built from numpy random weights; the toy
  run above covers a full, sharded `train_and_evaluate`. The EMA copy is set
  apart from the raw weights so that reading the wrong one shows.
  """
  workdir = str(tmp_path_factory.mktemp("image_run"))
  c = ml_collections.FrozenConfigDict(tiny.get_config("js"))
  _, _, variables = random_teacher()
  gen = variables["params"]
  st = state_lib.create_state(jax.random.PRNGKey(0), gen, gen, {}, state_lib.make_optimizers(
      c.optim), len(c.ema_decays))
  st = st.replace(step=jnp.int32(1), ema=(jax.tree.map(lambda p: 0.5 * p, gen),))
  with open(os.path.join(workdir, "generator_spec.json"), "w") as f:
    json.dump({"kind": "edm", "arch": c.teacher.arch.to_dict()}, f)
  mngr = ckpt_lib.manager(workdir, c)
  ckpt_lib.save(mngr, 1, st, c, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return workdir, jax.device_get(st)


def reference_noise(seed, n, shape):
  """The documented derivation, one sample at a time.

  z_i = normal(fold_in(fold_in(PRNGKey(seed), i), 0), shape).
  """
  base = jax.random.PRNGKey(seed)
  return np.stack([np.asarray(jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(base, i), 0), shape)) for i in range(n)])


def reference_toy_samples(params, seed, n, width=32, depth=2):
  """x = G(80 z, 80) with sampling.generate on a freshly built generator, batch n, one device."""
  module, shape, _ = REGISTRY.student_from_spec({"kind": "toy", "width": width, "depth": depth})
  z = jnp.asarray(reference_noise(seed, n, shape))
  return np.asarray(sampling.generate(module, params, z, None, 80.0))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_reads_back_the_checkpointed_weights(toy_run, tmp_path):
  workdir, state = toy_run
  out = ckpt_lib.export_generator(workdir, str(tmp_path / "gen"))
  assert sorted(os.listdir(out)) == [".fdistill_output", "export.json", "generator_spec.json",
                                     "params"]
  module, params, info = load_generator(out)
  assert_trees_equal(params, state.ema[0])          # exact: no arithmetic on the way
  decay = small_toy("js", total_steps=2).ema_decays[0]      # what the run was told
  assert (info["step"], info["which"], info["ema_decay"]) == (2, "ema:0", decay)
  assert info["divergence"] == "js" and info["source"] == os.path.abspath(workdir)
  assert isinstance(module, ToyDenoiser) and info["sample_shape"] == [2]

  _, raw, raw_info = load_generator(workdir, which="raw", step=2)
  assert_trees_equal(raw, state.gen)
  assert raw_info["which"] == "raw" and raw_info["ema_decay"] is None
  # One generator update with decay 0.99: EMA = 0.99 init + 0.01 gen differs from gen.
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(raw), jax.tree.leaves(params)))

  with pytest.raises(ValueError, match="not empty"):
    ckpt_lib.export_generator(workdir, out, which="raw")
  ckpt_lib.export_generator(workdir, out, which="raw", overwrite=True)
  assert_trees_equal(load_generator(out)[1], state.gen)
  assert os.listdir(tmp_path) == ["gen"]                 # no temporaries left


def test_samples_follow_the_documented_noise_and_are_reproducible(toy_run):
  workdir, state = toy_run
  module, params, info = load_generator(workdir)
  kw = dict(sample_shape=(2,), num_classes=0, sigma_init=info["sigma_init"])
  x8, labels = sampling.generate_samples(module, params, 37, seed=5, batch=16, **kw)
  x1, _ = sampling.generate_samples(module, params, 37, seed=5, batch=5,
                                    devices=jax.devices()[:1], **kw)
  other, _ = sampling.generate_samples(module, params, 37, seed=6, batch=16, **kw)
  # Tolerance 1e-6: the same per-sample noise, only the float32 batching differs.
  np.testing.assert_allclose(x8, x1, atol=1e-6, rtol=0)
  np.testing.assert_allclose(x8, reference_toy_samples(state.ema[0], 5, 37), atol=1e-6, rtol=0)
  assert x8.shape == (37, 2) and x8.dtype == np.float32
  np.testing.assert_array_equal(labels, -1)          # unconditional
  assert np.abs(x8 - other).min() > 0                # every sample changes with the seed


def test_cli_writes_toy_npz_and_plot(toy_run, tmp_path, capsys):
  workdir, state = toy_run
  out, grid = tmp_path / "s.npz", tmp_path / "toy.png"
  assert run_sample([f"--workdir={workdir}", "--num=20", f"--out={out}", f"--grid={grid}",
                     "--seed=2", "--batch=16"]) == 0
  assert capsys.readouterr().out.splitlines()[-2:] == [f"wrote {out}", f"wrote {grid}"]
  with np.load(out) as data:
    assert sorted(data.files) == ["labels", "samples"]
    assert data["samples"].dtype == np.float32 and data["labels"].dtype == np.int32
    np.testing.assert_allclose(data["samples"], reference_toy_samples(state.ema[0], 2, 20),
                               atol=1e-6, rtol=0)
  width, height = PIL.Image.open(grid).size         # teacher density | samples
  assert width > 1.5 * height
  assert sorted(os.listdir(tmp_path)) == ["s.npz", "toy.png"]      # no temporaries left


def test_cli_export_then_sample_the_export(toy_run, tmp_path):
  workdir, state = toy_run
  exported = tmp_path / "exported"
  assert run_sample([f"--workdir={workdir}", f"--export={exported}", "--which=raw"]) == 0
  assert json.loads((exported / "export.json").read_text())["which"] == "raw"
  assert run_sample([f"--workdir={workdir}", f"--export={exported}"]) == 1   # not empty
  out = tmp_path / "s.npz"
  assert run_sample([f"--workdir={exported}", "--num=20", f"--out={out}", "--batch=16"]) == 0
  with np.load(out) as data:
    np.testing.assert_allclose(data["samples"], reference_toy_samples(state.gen, 0, 20),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--workdir={missing}"], "does not exist"),
    (["--workdir={empty}"], "generator_spec.json"),
    (["--workdir={workdir}", "--num=0"], "must both be positive"),
    (["--workdir={workdir}", "--labels=1"], "unconditional"),
    (["--workdir={workdir}", "--which=ema:3"], "1 EMA copies"),
    (["--workdir={workdir}", "--which=best"], "expected 'ema'"),
    (["--workdir={workdir}", "--step=7"], "available steps: \\[2\\]"),
    (["--teacher={missing}", "--num_steps=1"], "at least 2"),
    (["--teacher={missing}"], "does not exist"),
    ([], "exactly one of"),
])
def test_bad_input_fails_clearly_and_writes_nothing(toy_run, tmp_path, capsys, args, message):
  workdir, _ = toy_run
  paths = dict(workdir=workdir, missing=tmp_path / "nope", empty=tmp_path / "empty")
  (tmp_path / "empty").mkdir()
  out = tmp_path / "s.npz"
  argv = ["--num=4", f"--out={out}"] + [a.format(**paths) for a in args]   # last --num wins
  assert run_sample(argv) == 1
  err = capsys.readouterr().err
  assert re.search(message, err) and err.startswith("sample: error: ")
  assert not out.exists()


def test_missing_checkpoints_name_the_path(tmp_path):
  (tmp_path / "generator_spec.json").write_text(json.dumps({"kind": "toy", "width": 4,
                                                            "depth": 1}))
  with pytest.raises(ckpt_lib.CheckpointError, match=f"{tmp_path}/checkpoints"):
    load_generator(str(tmp_path))


def test_unreadable_newest_checkpoint_falls_back(toy_run, tmp_path, caplog):
  """A newest step whose array data is gone is skipped with a warning (as training resumes)."""
  workdir, state = toy_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  shutil.copytree(copy / "checkpoints" / "2", copy / "checkpoints" / "3")
  for data_dir in (copy / "checkpoints" / "3" / "state").rglob("d"):
    shutil.rmtree(data_dir)
  _, params, info = load_generator(str(copy))
  assert info["step"] == 2
  assert_trees_equal(params, state.ema[0])
  assert "Skipping unreadable checkpoint at step 3" in caplog.text
  with pytest.raises(ckpt_lib.CheckpointError, match="No readable checkpoint"):
    load_generator(str(copy), step=3)


def test_image_generator_cli(image_run, tmp_path):
  workdir, state = image_run
  out, grid = tmp_path / "s.npz", tmp_path / "grid.png"
  assert run_sample([f"--workdir={workdir}", "--num=10", f"--out={out}", f"--grid={grid}",
                     "--batch=8", "--labels=0,3"]) == 0
  with np.load(out) as data:
    images, labels = data["images"], data["labels"]
  assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 3] * 5)
  width, height = PIL.Image.open(grid).size             # ceil(sqrt(10)) = 4 columns, 3 rows
  assert width > 4 * 8 * 4 and height > 3 * 8 * 4          # tiles enlarged, labelled

  module, params, info = load_generator(workdir)
  assert info["num_classes"] == 4 and info["step"] == 1
  assert_trees_equal(params, state.ema[0])
  x, _ = sampling.generate_samples(module, params, 10, sample_shape=(8, 8, 3), num_classes=4,
                                   sigma_init=80.0, batch=8, classes=(0, 3))
  # EDM's conversion (generate.py), written out: (x * 127.5 + 128).clip(0, 255) -> uint8.
  np.testing.assert_array_equal(images, np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8))
  keys = [jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), i), 1) for i in range(10)]
  np.testing.assert_array_equal(sampling.sample_labels(jax.random.PRNGKey(0), jnp.arange(10), 4),
                                [int(jax.random.randint(k, (), 0, 4)) for k in keys])

  with pytest.raises(sampling.SampleError, match=r"outside \[0, 3\]"):
    sampling.parse_labels("1,4", 4)
  assert run_sample([f"--workdir={workdir}", "--num=2", f"--out={tmp_path / 'bad.npz'}",
                     "--labels=-1"]) == 1
  assert not (tmp_path / "bad.npz").exists()


def test_teacher_heun_path_matches_the_batched_sampler(tmp_path):
  arch, module, variables = random_teacher()
  kwargs = sampling.sampler_settings("cifar10", num_steps=2)
  x, labels = sampling.teacher_samples(module, variables, 3, sampler_kwargs=kwargs, seed=1,
                                       batch=8)
  assert x.shape == (3, 8, 8, 3) and labels.shape == (3,) and labels.min() >= 0
  # Independent: EDM's deterministic Heun sampler on the whole batch with the documented latents.
  latents = jnp.asarray(reference_noise(1, 3, (8, 8, 3)))
  y = jax.nn.one_hot(labels, 4)
  batched = jax.jit(lambda v, c, z: edm_sampler.edm_sampler(
      lambda a, s, c: module.apply(v, a, s, c), jax.random.PRNGKey(0), (3, 8, 8, 3),
      class_labels=c, latents=z, **kwargs))
  expected = np.asarray(batched(variables, y, latents))
  # float32 through 3 network calls, batched vs one sample at a time: 1e-4 relative to the
  # largest value.
  np.testing.assert_allclose(x, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)

  edm.save_converted(tmp_path / "teacher", arch, variables)
  out = tmp_path / "t.npz"
  assert run_sample([f"--teacher={tmp_path / 'teacher'}", "--num_steps=2", "--num=3",
                     "--seed=1", f"--out={out}"]) == 0
  with np.load(out) as data:
    np.testing.assert_array_equal(data["images"], pixels.to_uint8(x))
    np.testing.assert_array_equal(data["labels"], labels)


@pytest.mark.slow      # builds and samples the full EDM fixture network
def test_teacher_state_dict_needs_and_takes_arch(tmp_path, edm_fixtures, capsys):
  """`--teacher=weights.npz` (a plain EDM state dict) is refused without --arch, naming the
  flag, and with --arch samples exactly what the converted teacher samples."""
  weights, arch = edm_fixtures / "songunet_tiny_weights.npz", edm_fixtures / "songunet_tiny_config.json"
  args = ["--num=2", "--batch=2", "--num_steps=2", "--seed=3"]
  assert run_sample([f"--teacher={weights}", f"--out={tmp_path / 'x.npz'}", *args]) == 1
  err = capsys.readouterr().err
  assert "--arch" in err and not (tmp_path / "x.npz").exists()
  assert run_sample([f"--teacher={weights}", f"--arch={tmp_path / 'nope.json'}",
                     f"--out={tmp_path / 'x.npz'}", *args]) == 1
  assert "nope.json" in capsys.readouterr().err
  assert run_sample([f"--workdir={tmp_path}", f"--arch={arch}",
                     f"--out={tmp_path / 'x.npz'}", *args]) == 1
  assert "--arch describes a --teacher" in capsys.readouterr().err

  out = tmp_path / "from_state_dict.npz"
  assert run_sample([f"--teacher={weights}", f"--arch={arch}", f"--out={out}", *args]) == 0
  edm.convert(weights, tmp_path / "converted", arch=str(arch))
  ref = tmp_path / "from_converted.npz"
  assert run_sample([f"--teacher={tmp_path / 'converted'}", f"--out={ref}", *args]) == 0
  with np.load(out) as a, np.load(ref) as b:
    assert a["images"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.slow      # two toy runs through main and a resume
def test_a_run_without_ema_resumes_and_samples_its_raw_generator(tmp_path):
  """ema_decays=() (the text-to-image configs, as FastGen's SD configs and DMD2): the run
  checkpoints and resumes, and which='ema' (the default of tools.sample and the T2I
  tools) reads the raw generator, equal to the checkpoint's 'gen'; 'ema:0' still fails."""
  workdir = str(tmp_path / "run")
  for total in (2, 4):
    loop.train_and_evaluate(small_toy("js", ema_decays=(), total_steps=total,
                                      checkpoint_every=2), workdir, registry=REGISTRY)
  params, info = ckpt_lib.restore_generator_params(workdir)
  assert (info["step"], info["which"], info["ema_decay"]) == (4, "raw", None)
  raw, _ = ckpt_lib.restore_generator_params(workdir, which="raw")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(raw)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ckpt_lib.CheckpointError, match="keeps no EMA"):
    ckpt_lib.restore_generator_params(workdir, which="ema:0")
