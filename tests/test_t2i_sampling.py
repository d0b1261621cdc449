"""Sampling a text-to-image run (fdistill_jax.problems.t2i.run_sampling, sd.grid, tools.sample).

The run is the `run8` fixture (tests/conftest.py) (configs/sd15.py:js,tiny, 4 iterations through `main` on 8
devices; made once per session and shared), whose config runs the 't2i_grid'
evaluator every 2 iterations. Compiles dominate: each test compiles one sampler.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from fdistill_jax import plugins
from fdistill_jax.loaders import sd_configs
from fdistill_jax.pipelines import denoisers as denoiser_lib
from fdistill_jax.problems.t2i import grid as sd_grid
from fdistill_jax.pipelines import sd as pipeline_lib
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.pipelines import sd_sampling
from fdistill_jax.tools import cli
from fdistill_jax.tools import sample
from fdistill_jax.train import checkpoint as ckpt_lib
from tests.t2i_helpers import features

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)

PROMPTS = ["a photo of a cat", "two dogs playing in the snow", "a red car"]


@pytest.fixture(scope="module")
def run(run8):
  return run_sampling.load_run(run8, registry=REGISTRY)


def run_sample(args):
  return cli.invoke(sample.main, "sample", sample.FLAGS, args)


def test_load_run_reads_the_runs_ema_generator_and_teacher(run, run8):
  assert run.info["step"] == 4 and run.info["which"] == "ema:0"
  assert run.latent_shape == (8, 8, 4) and run.sigma_init == pytest.approx(14.6146)
  assert set(run.teacher_vars["params"]) == {"unet", "text_encoder", "vae"}
  raw = run_sampling.load_run(run8, which="raw", registry=REGISTRY)
  gap = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(run.generator_params), jax.tree.leaves(raw.generator_params)))
  assert gap > 0                                # EMA (decay 0.9) is not the raw generator


@pytest.mark.slow      # samples the tiny SD student at several batch sizes
def test_student_images_depend_only_on_seed_and_index(run):
  """Image i of (seed, prompts, num_per_prompt) is the same whatever the batch and devices,
  and equals G(sigma_init z_i, sigma_init, E(prompt)) decoded, computed here directly
  (text tower, generator U-Net and VAE applied one by one; uint8 rounding: atol 1)."""
  kw = dict(seed=5, num_per_prompt=2)
  a, idx = run_sampling.generate(run, PROMPTS, batch=4, devices=jax.devices(), **kw)
  b, idx_b = run_sampling.generate(run, PROMPTS, batch=1, devices=jax.devices()[:1], **kw)
  assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(idx_b, idx)
  np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)
  assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 8     # two noises, one prompt
  c, _ = run_sampling.generate(run, PROMPTS, batch=4, devices=jax.devices(), seed=6,
                               num_per_prompt=2)
  assert np.abs(a.astype(int) - c.astype(int)).max() > 8

  i = 3                                                             # prompt 1, second image
  t = run.teacher
  tv = run.teacher_vars["params"]
  ids = jnp.asarray(run.tokenizer([PROMPTS[1]]))
  context = t.text_encoder.apply({"params": tv["text_encoder"]}, ids)[0]
  z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(5), i), 0),
                        run.latent_shape)[None]
  s = run.sigma_init
  unet = denoiser_lib.unet_denoiser(t.unet, {"params": run.generator_params["unet"]},
                                    t.schedule())
  latents = unet(s * z, jnp.full((1,), s), context)
  image = t.vae.apply({"params": tv["vae"]}, latents / t.scaling_factor, method="decode")
  want = np.clip(np.round((np.asarray(image[0]) + 1) * 127.5), 0, 255)
  np.testing.assert_allclose(a[i].astype(int), want, atol=1)


def test_teacher_sampling_equals_sd_sampling_on_the_same_networks(run):
  """The run's frozen teacher with 3 guided DDIM steps = `pipelines.sd_sampling.sample` on a Pipeline
  of the same variables and SD 1.5's own scheduler config (text encoding, guided
  denoiser, schedule and decoding all on the other path; uint8 rounding: atol 1).
  sd_sampling.s DDIM levels and steps are checked against diffusers' DDIMScheduler loop in
  test_sd_denoiser.py."""
  t = run.teacher
  tv = run.teacher_vars["params"]
  pipe = pipeline_lib.Pipeline(
      t.unet, t.text_encoder, t.vae, {k: {"params": v} for k, v in tv.items()},
      denoiser_lib.DiscreteSchedule.from_config(sd_configs.SD15_CONFIGS["scheduler"]),
      t.scaling_factor, t.shift_factor, run.tokenizer)
  kw = dict(steps=3, cfg=3.0, seed=2, batch=2, devices=jax.devices()[:2])
  want, want_idx = sd_sampling.sample(pipe, PROMPTS[:2], height=16, width=16, **kw)
  got, idx = run_sampling.teacher_generate(run, PROMPTS[:2], **kw)
  np.testing.assert_array_equal(idx, want_idx)
  assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
  np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)
  unguided, _ = run_sampling.teacher_generate(run, PROMPTS[:2], **{**kw, "cfg": 1.0})
  assert np.abs(unguided.astype(int) - got.astype(int)).max() > 8   # the check sees CFG


def test_grid_evaluator_wrote_a_png_and_a_tensorboard_image(run8):
  """configs/sd15.py:tiny runs 't2i_grid' (2 prompts) every 2 steps, through main (run8: 4)."""
  png = os.path.join(run8, ckpt_lib.SAMPLES, "t2i_step_0000004.png")
  with PIL.Image.open(png) as im:
    width, height = im.size
  # Two rows of 2-inch tiles at 100 dpi, two columns: taller than wide, about 4 x 5 inches.
  assert 300 < width < 500 and 400 < height < 650 and height > width, (width, height)
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(run8, size_guidance={"tensors": 0})
  acc.Reload()
  events = acc.Tensors(sd_grid.TB_TAG)
  assert [e.step for e in events] == [2, 4]
  value = tensor_util.make_ndarray(events[0].tensor_proto)   # [width, height, PNG bytes]
  assert [int(v) for v in value[:2]] == [2 * 17 + 1, 2 * 17 + 1]   # 2x2 tiles of 16 + padding


def test_grid_prompts_come_from_the_file_or_the_config(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  ec = ml_collections.ConfigDict({"grid_prompts": ("a", "b"), "grid_prompts_file": ""})
  assert sd_grid.grid_prompts(ec) == ["a", "b"]
  (tmp_path / "p.txt").write_text("one\n\n two \n")
  ec.grid_prompts_file = str(tmp_path / "p.txt")
  assert sd_grid.grid_prompts(ec) == ["one", "two"]
  ec.grid_prompts_file = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="eval.grid_prompts_file=.*one prompt per line"):
    sd_grid.grid_prompts(ec)


def test_tools_sample_writes_the_t2i_npz_and_grid(run, run8, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red car\n\n")
  out, grid = tmp_path / "s.npz", tmp_path / "g.png"
  assert run_sample([f"--workdir={run8}", f"--prompt={PROMPTS[0]}", f"--prompts_file={prompts}",
                     "--num_per_prompt=2", "--seed=5", "--batch=3", f"--out={out}",
                     f"--grid={grid}"]) == 0
  with np.load(out) as data:
    assert sorted(data.files) == ["images", "prompt_index", "prompts", "seed"]
    assert data["images"].shape == (4, 16, 16, 3) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["prompt_index"], [0, 0, 1, 1])
    assert list(data["prompts"]) == [PROMPTS[0], "a red car"] and int(data["seed"]) == 5
    want, _ = run_sampling.generate(run, [PROMPTS[0], "a red car"], seed=5, batch=3,
                                    num_per_prompt=2)   # the CLI's program: compile cache
    np.testing.assert_allclose(data["images"].astype(int), want.astype(int), atol=1)
  assert PIL.Image.open(grid).size[0] > 100
  assert "a red car" in (tmp_path / "g.png.txt").read_text()


def test_tools_sample_bad_inputs_are_one_line_errors(run8, tmp_path, capsys):
  out = tmp_path / "s.npz"
  def error(args):
    assert run_sample(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err
  assert "give --prompt" in error([f"--workdir={run8}", f"--out={out}"])
  assert "--num" in error([f"--workdir={run8}", "--prompt=x", "--num=4", f"--out={out}"])
  edm_run = tmp_path / "edm_run"                  # checked before anything is loaded
  edm_run.mkdir()
  (edm_run / ckpt_lib.GENERATOR_SPEC).write_text(json.dumps({"kind": "edm"}))
  assert "class labels" in error([f"--workdir={edm_run}", "--prompt=x", f"--out={out}"])
  export = tmp_path / "export"
  ckpt_lib.export_generator(run8, str(export))
  assert "U-Net alone" in error([f"--workdir={export}", "--prompt=x", f"--out={out}"])
  assert not out.exists()


def test_from_models_refuses_a_class_conditional_run():
  from fdistill_jax.train import models as models_lib  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import conditioning  # pylint: disable=g-import-not-at-top
  m = models_lib.Models(teacher=None, student=None, heads=None, feature_keys=(),
                        sample_shape=(8, 8, 3), num_classes=10,
                        conditioning=conditioning.LabelConditioning(10, (8, 8, 3)))
  with pytest.raises(run_sampling.RunError, match="not text-conditional"):
    run_sampling.from_models(m, {}, 80.0)


def _eval_context(run8, **eval_fields):
  """What the 't2i' evaluator reads of an EvalContext, for the run's networks."""
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import models as models_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run8, ckpt_lib.CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.eval.update(eval_fields)
  teacher = REGISTRY.teacher(config)
  return types.SimpleNamespace(config=config, models=models_lib.from_teacher(teacher, config.disc),
                               teacher_vars=teacher.variables, devices=tuple(jax.devices()))


def test_t2i_evaluator_scores_the_students_images_of_the_first_prompts(run, run8, tmp_path,
                                                                        monkeypatch, clip_folders):
  """The periodic 't2i' evaluator = T2IMetrics (FID with a stand-in feature function, CLIP
  score with a tiny CLIP) of `run_sampling.generate`'s images of the first
  `eval.num_samples` prompts from seed + 3, computed here on the other path (exact: the
  same images give the same numbers, float equality up to 1e-9)."""
  from fdistill_jax.problems.t2i import evaluator as t2i_evaluator  # pylint: disable=g-import-not-at-top
  from fdistill_jax.metrics.t2i import metrics as t2i_metrics  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(t2i_metrics.fid, "load_feature_fn", lambda *a, **k: features)
  rng = np.random.default_rng(0)
  ref_images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  t2i_metrics.reference_stats(ref_images, features, tmp_path / "ref.npz", batch_size=8)
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS + ["unused prompt"]) + "\n")
  fields = dict(fid_every=2, num_samples=3, prompts=str(tmp_path / "prompts.txt"),
                ref=str(tmp_path / "ref.npz"), inception="stand-in",
                clip=str(clip_folders[0]["tied"]), batch=2)
  ctx = _eval_context(run8, **fields)
  evaluator = t2i_evaluator.build(ctx)
  assert evaluator.every == 2 and evaluator.prompts == PROMPTS
  got = evaluator({"generator": run.generator_params}, 2)

  images, _ = run_sampling.generate(run, PROMPTS, seed=int(ctx.config.seed) + 3)
  want = t2i_metrics.T2IMetrics(str(tmp_path / "ref.npz"), feature_fn=features,
                                clip=str(clip_folders[0]["tied"]))(images, PROMPTS)
  assert set(got) == {"eval/fid", "eval/clip_score", "eval/clip_score_x100"}
  for k in ("fid", "clip_score", "clip_score_x100"):
    assert got[f"eval/{k}"] == pytest.approx(want[k], rel=1e-9, abs=1e-9), k
  assert got["eval/fid"] > 0

  assert t2i_evaluator.build(_eval_context(run8, **{**fields, "fid_every": 0})) is None
  for change, message in (({"prompts": ""}, "needs eval.prompts"),
                          ({"num_samples": 9}, "holds 4 prompts"),
                          ({"ref": "", "clip": ""}, "nothing to compute"),
                          ({"inception": ""}, "eval.inception is not")):
    with pytest.raises(ValueError, match=message):
      t2i_evaluator.build(_eval_context(run8, **{**fields, **change}))



def test_periodic_t2i_evaluation_needs_fid_inputs_or_a_clip_folder():
  """config_lib.validate: eval.fid_every > 0 needs eval.inception and eval.ref, or (with no
  'fid' evaluator) eval.clip alone."""
  from configs import sd15  # pylint: disable=g-import-not-at-top
  from fdistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = sd15.get_config("js")
  c.eval.fid_every = 100
  with pytest.raises(ValueError, match="eval.clip alone"):
    config_lib.validate(c, num_devices=1)
  c.eval.clip = "clip-folder"
  config_lib.validate(c, num_devices=1)
  c.eval.evaluators = ("fid",)
  with pytest.raises(ValueError, match="eval.inception"):
    config_lib.validate(c, num_devices=1)
