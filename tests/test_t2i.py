"""Text-to-image f-distill on tiny random SD networks (configs/sd15.py:tiny).

Compiles and checkpoint saves dominate: one run through `main` on 8 devices is
shared (the `run8` fixture, tests/conftest.py) by the 1-device comparison, the SIGKILL-resume test (its
uninterrupted reference) and the warm-start tests; the gradient test compiles its
own loss. Data are tiny WebDataset shards the tests write.
"""

import functools
import io
import json
import os
import sys
import tarfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import sd15
from fdistill_jax import config_lib
from fdistill_jax import losses
from fdistill_jax import plugins
from fdistill_jax.data import registry as data_registry
from fdistill_jax.data import webdataset
from fdistill_jax.pipelines import denoisers as sd_denoiser
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop as train
from fdistill_jax.train import noise as noise_lib
from fdistill_jax.train import steps
from fdistill_jax.train import warm_start
from tests.helpers import REPO, assert_trees_equal, read_scalars, saved_state, saved_steps
from tests.helpers import sigkill_after_first_checkpoint
from tests.t2i_helpers import RUN8_STEPS, add_member, main_args, run_main, tiny_config, write_shards

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)

# ----------------------------------------------------------------------------
# The run.


@pytest.mark.slow      # the run8 fixture: tiny SD through main on 8 devices
def test_sd15_run_through_main_trains_all_three_networks(run8):
  assert saved_steps(run8) == [2, 4]
  spec = json.load(open(os.path.join(run8, ckpt_lib.GENERATOR_SPEC)))
  assert spec["kind"] == "sd15" and spec["sample_shape"] == [8, 8, 4]
  parts, step = warm_start.restore_parts(run8)
  assert step == 4
  start = jax.tree.leaves(REGISTRY.teacher(tiny_config()).student_params)
  for name in ("gen", "fake"):        # both started from the teacher U-Net and moved
    now = jax.tree.leaves(parts[name])
    assert len(start) == len(now)
    assert any(not np.allclose(a, b) for a, b in zip(start, now)), name
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(parts))


@pytest.mark.slow      # generic: the toy's 1 vs 8 devices (test_train) runs by default
def test_one_device_and_eight_devices_agree(run8, shards, tmp_path):
  """The same 2 iterations on 1 device give the 8-device run's networks at step 2.

  Tolerance 1e-4 relative, plus 1e-4 of the leaf's largest magnitude absolute: only the
  order of float32 reductions differs (batch means and the U-Net's sums are split over
  devices), and Adam's normalised update carries that round-off into entries whose
  gradients are tiny (measured: one entry of 64 off by 1.3e-5 on a leaf of magnitude ~1).
  """
  c = ml_collections.FrozenConfigDict(tiny_config(**{"data.path": shards,
                                                    "sample_every": 0}))  # no grid to compile
  trainer = train.Trainer(c, devices=jax.devices()[:1], registry=REGISTRY)
  assert trainer.mesh.devices.size == 1
  train.run(trainer, str(tmp_path))
  one = jax.device_get(trainer.state)
  assert int(one.step) == 2
  eight = saved_state(run8, 2)
  for name in ("gen", "fake", "disc"):
    for a, b in zip(jax.tree.leaves(getattr(one, name)), jax.tree.leaves(eight[name])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))),
                                 err_msg=name)


@pytest.mark.slow      # the run8 fixture
def test_warm_start_restores_exactly_the_named_parts(run8, shards, tmp_path, monkeypatch):
  """init_from: generator, fake score and heads from the run; step, optimiser states,
  EMA (= the loaded generator) and the stage-1 running mean start afresh."""
  c = tiny_config(**{"data.path": shards, "init_from": run8})
  trainer = train.build_trainer(c, registry=REGISTRY)
  fresh = jax.device_get(trainer.state)
  seen = {}
  monkeypatch.setattr(train, "_loop", lambda t, *a: seen.setdefault("state", t.state))
  train.run(trainer, str(tmp_path))            # the loop hook: warm start, then _loop
  st = jax.device_get(seen["state"])
  parts, _ = warm_start.restore_parts(run8)
  for name in ("gen", "fake", "disc"):
    for a, b in zip(jax.tree.leaves(getattr(st, name)), jax.tree.leaves(parts[name])):
      np.testing.assert_array_equal(a, b)
  for e in st.ema:
    for a, b in zip(jax.tree.leaves(e), jax.tree.leaves(parts["gen"])):
      np.testing.assert_array_equal(a, b)
  assert int(st.step) == 0
  for a, b in zip(jax.tree.leaves((st.gen_opt, st.fake_opt, st.disc_opt, st.log_ratio_ema)),
                  jax.tree.leaves((fresh.gen_opt, fresh.fake_opt, fresh.disc_opt,
                                   fresh.log_ratio_ema))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(st.rng, fresh.rng)


@pytest.mark.parametrize("config_file, says", [
    ("sd15.py:js", True), ("sd15.py:fkl", True), ("sdxl.py:js", True), ("sd15.py:rkl", False),
    ("cifar10.py:js", False)])
def test_cold_js_and_fkl_runs_say_how_the_paper_warm_starts(monkeypatch, config_file, says):
  """One line for a js / fkl text-to-image run that starts without init_from (`train.loop`
  calls `advise` then), saying why (Sec. 5) and how; none for rkl (the run to warm-start
  from) nor for the EDM configs."""
  lines = []
  monkeypatch.setattr(warm_start.console, "say", lambda msg, *a: lines.append(msg % a))
  warm_start.advise(config_lib.load_config_file(os.path.join(REPO, "configs", config_file)))
  assert len(lines) == int(says), lines
  if says:
    assert "reverse-KL" in lines[0] and "--config.init_from=RUN_DIR" in lines[0]


@pytest.mark.slow      # the run8 fixture
def test_warm_start_refuses_a_run_of_other_networks(run8, shards):
  c = tiny_config(**{"data.path": shards, "disc.resolutions": (8,)})
  trainer = train.build_trainer(c, registry=REGISTRY)
  with pytest.raises(ckpt_lib.CheckpointError, match="'disc' does not fit"):
    warm_start.warm_start(trainer.state, run8)
  with pytest.raises(ckpt_lib.CheckpointError, match="not a directory"):
    warm_start.warm_start(trainer.state, os.path.join(run8, "nothing"))


@pytest.mark.slow      # generic: the toy's SIGKILL resume (test_checkpoint) runs by default
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_exact(run8, shards, tmp_path):
  """The run of `run8` (WebDataset shards, SD networks, 8 devices), SIGKILLed at a random
  moment after its first checkpoint (step 2: during steps 3-4 or the final save) and run
  again, resumes and ends bitwise equal to `run8`, which was never interrupted: networks,
  optimiser states, EMA, ratio statistics and RNG. The data order is part of it: every
  update reads its step's batch (`source.batch(step)`, a function of seed and step), so
  a resumed run that re-read or skipped batches would end with other parameters."""
  killed = tmp_path / "killed"
  args = main_args(killed, shards, "js", *RUN8_STEPS)
  at_kill = sigkill_after_first_checkpoint(
      [sys.executable, "-m", "fdistill_jax.main", *args], killed, max_delay=0.3)
  assert at_kill == [2], at_kill
  run_main(args)                                   # the same command resumes from step 2
  assert saved_steps(killed) == [2, 4]
  assert "Resumed from checkpoint at step 2." in (killed / ckpt_lib.LOG_FILE).read_text()
  assert_trees_equal(saved_state(run8, 4), saved_state(killed, 4))


# The variants of configs/sd15.py through `main`, beyond run8's js: the code paths of
# the SD steps that no other test runs, one iteration each in this process. Each
# variant is a new generator (and often critic) program, 30-90 s to compile here even
# at the tiny size, so the rest are covered where they are cheap: a divergence enters
# only through h(r) in `losses.fdistill_generator_loss` (every divergence: unit tests
# in test_divergences / test_losses, and through `main` on the toy problem in
# test_train; fkl through the SD generator loss in the gradient test below); gan_only
# and no_gan are loss weights of the engine's generic steps (through `main` on the toy
# problem, test_train); cfg5 is one constant of js's program (config test below).
# (variant, data, networks updated): 'captions' is the prompts-only source.
VARIANTS = (
    ("rkl,no_gan", "captions", ("gen", "fake")),     # h = 1, no GAN, no real branch
)


@pytest.mark.slow
def test_variants_run_an_iteration_through_main(shards, tmp_path):
  """Each of VARIANTS: one iteration (generator step, then critic step) through `main` on 8
  devices; every logged loss is finite; the networks the variant trains moved (optimiser
  update counts; the generator's parameters left the teacher's) and the others did not;
  the loss terms logged are the variant's (no GAN term under no_gan, no f-distill term
  and an untouched ratio running mean under gan_only, h = 1 for rkl)."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a dog\na red car\nan astronaut riding a horse\n")
  start = jax.tree.leaves(REGISTRY.teacher(tiny_config()).student_params)
  for variant, data, trained in VARIANTS:
    workdir = tmp_path / variant.replace(",", "_")
    extra = ["--config.total_steps=1", "--config.fake_score_update_freq=1"]
    if data == "captions":
      extra += ["--config.data.kind=captions", f"--config.data.path={prompts}"]
    run_main(main_args(workdir, shards, variant, *extra))
    config = sd15.get_config(variant)
    scalars = {k: v[-1][1] for k, v in read_scalars(workdir).items()}
    assert all(np.isfinite(v) for v in scalars.values()), (variant, scalars)
    assert ("gen/fdistill_loss" in scalars) == (config.loss.fdistill_weight > 0), variant
    assert ("gen/gan_loss" in scalars) == (config.loss.gan_weight > 0), variant
    assert ("disc/loss" in scalars) == ("disc" in trained), variant
    if config.divergence == "rkl" and config.loss.fdistill_weight > 0:
      assert scalars["fdistill/h_min"] == scalars["fdistill/h_max"] == 1.0, variant
    st = saved_state(workdir, 1)
    for name in ("gen", "fake", "disc"):    # inject_hyperparams' update count (after a clip)
      opt = st[f"{name}_opt"]
      count = (opt[-1] if isinstance(opt, list) else opt)["count"]
      assert int(count) == (name in trained), (variant, name)
    assert any(not np.array_equal(a, b) for a, b in zip(start, jax.tree.leaves(st["gen"])))
    assert np.any(st["log_ratio_ema"] != 0) == (config.loss.fdistill_weight > 0), variant


# ----------------------------------------------------------------------------
# The generator's gradient: Eq. 4 with the CFG teacher.


@pytest.mark.slow      # compiles the tiny SD generator step and its reference
def test_generator_gradient_is_the_vjp_of_eq4_with_the_cfg_teacher(shards):
  """dL/dtheta = (dx/dtheta)^T dL/dx with the teacher's score replaced by its CFG version,
  D_u + w (D_c - D_u) (paper App. D), and the teacher, fake score and ratio constant.

  The reference builds the guided teacher independently: the text tower applied
  directly, the empty prompt's embedding from the tokenizer, the U-Net through
  `pipelines.denoisers.unet_denoiser` and `cfg_denoiser` (not the engine's code).
  Tolerance 1e-4 relative, plus 1e-5 of the largest gradient entry absolute (float32,
  different summation orders; leaves with tiny gradients differ by ~1e-7).
  """
  c = ml_collections.FrozenConfigDict(tiny_config(**{
      "data.path": shards, "loss.gan_weight": 0.0, "divergence": "fkl", "loss.cfg_weight": 3.0}))
  trainer = train.Trainer(c, devices=jax.devices()[:1], registry=REGISTRY)
  m, st, tv = trainer.models, trainer.state, trainer.teacher_vars
  noise = np.random.default_rng(0)      # a fake score away from the teacher: D_fake - D_teacher
  st = st.replace(fake=jax.tree.map(    # is then O(1), not float noise
      lambda p: p + 0.05 * noise.standard_normal(p.shape).astype(np.float32), st.fake))
  data = m.conditioning.host(trainer.source.batch(0, global_batch_size=c.batch_size))
  rng = jax.random.PRNGKey(3)
  loss = lambda p: steps.generator_loss(p, st, tv, rng, models=m, config=c, data=data)[0]
  grads = jax.jit(jax.grad(loss))(st.gen)

  teacher = m.teacher
  text = lambda ids: teacher.text_encoder.apply({"params": tv["params"]["text_encoder"]}, ids)[0]
  context = text(jnp.asarray(data["tokens"]))
  uncond = text(jnp.asarray(m.conditioning.tokenizer([""])))[0]
  schedule = teacher.schedule()
  guided = sd_denoiser.cfg_denoiser(sd_denoiser.unet_denoiser(
      teacher.unet, {"params": tv["params"]["unet"]}, schedule), uncond, 3.0)
  k_x, k_s, k_e = jax.random.split(rng, 3)
  def sample(p):
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k_x, i), 0),
                                             m.sample_shape))(jnp.arange(c.batch_size))
    s = c.loss.sigma_init
    return sd_denoiser.unet_denoiser(teacher.unet, {"params": p["unet"]}, schedule)(
        s * z, jnp.full((c.batch_size,), s), context)
  x, vjp = jax.vjp(sample, st.gen)
  sigma = noise_lib.noise_levels(c, steps.generator_term(c), k_s, c.batch_size)
  x_t = x + sigma[:, None, None, None] * jax.random.normal(k_e, x.shape)
  d_t = guided(x_t, sigma, context)
  d_cond = sd_denoiser.unet_denoiser(teacher.unet, {"params": tv["params"]["unet"]}, schedule)(
      x_t, sigma, context)
  d_f = sd_denoiser.unet_denoiser(teacher.unet, {"params": st.fake["unet"]}, schedule)(
      x_t, sigma, context)
  _, feats = m.teacher.apply(tv, x_t, sigma, context, feature_resolutions=m.feature_keys)
  logit = jnp.mean(m.heads.apply({"params": st.disc}, feats), -1)
  lc = c.loss
  def loss_in_x(xx, d_t=d_t):
    return losses.fdistill_generator_loss(
        xx, d_t, d_f, logit, sigma, divergence="fkl", num_bins=lc.num_bins,
        logit_clip=lc.logit_clip, ratio_clip=tuple(lc.ratio_clip),
        bin_ids=noise_lib.bin_indices(c, sigma))[0]
  expected = vjp(jax.grad(loss_in_x)(x))[0]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
  unguided = vjp(jax.grad(functools.partial(loss_in_x, d_t=d_cond))(x))[0]
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(expected),
                                                           jax.tree.leaves(unguided)))
  assert gap > 1e-2 * scale, (gap, scale)     # the check can tell CFG from no CFG
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------
# Data.


def test_webdataset_source_is_deterministic_per_process_and_skips_bad_examples(tmp_path):
  folder = write_shards(tmp_path / "s", n=12, per=5, corrupt=(3,), empty=(7,))
  config = ml_collections.ConfigDict(dict(kind="webdataset", path=folder, resolution=8,
                                          seed=1, num_threads=2))
  a, b = data_registry.make_source(config), data_registry.make_source(config)
  assert a.num_examples == 12 and a.image_shape == (8, 8, 3)
  for step in (0, 3, 7):
    full = a.batch(step, global_batch_size=6)
    again = b.batch(step, global_batch_size=6)
    np.testing.assert_array_equal(full["images"], again["images"])
    assert full["captions"] == again["captions"]
    halves = [b.batch(step, global_batch_size=6, process_index=p, process_count=2)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]), full["images"])
    assert sum((h["captions"] for h in halves), []) == full["captions"]
    assert full["images"].dtype == np.float32 and np.abs(full["images"]).max() <= 1
  every = a.batch(0, global_batch_size=12)      # one epoch: every example once
  assert "a photo of thing 3" not in every["captions"]     # corrupt image: skipped
  assert "a photo of thing 7" not in every["captions"]     # empty caption: skipped
  assert every["captions"].count("a photo of thing 4") == 2    # row of 3 reads 4
  assert every["captions"].count("a photo of thing 8") == 2    # row of 7 reads 8
  assert a.skipped["cannot decode the image"] >= 1 and a.skipped["empty caption"] >= 1


def test_webdataset_center_crop_and_resize_match_pil(tmp_path):
  """Row of example 0: PIL's own center square crop + bicubic resize, scaled to [-1, 1]."""
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buf, "PNG")
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    add_member(tar, "00000.png", buf.getvalue())
    add_member(tar, "00000.txt", b"a cat")
  source = webdataset.webdataset_source(ml_collections.ConfigDict(dict(
      path=str(tmp_path / "00000.tar"), resolution=8, num_threads=1)))
  got = source.batch(0, global_batch_size=1)
  want = np.asarray(PIL.Image.fromarray(pixels[:, 2:22]).resize((8, 8), PIL.Image.BICUBIC))
  np.testing.assert_allclose(got["images"][0], want / 127.5 - 1, atol=1e-6)
  assert got["captions"] == ["a cat"]


def test_captions_source_reads_txt_and_jsonl(tmp_path):
  (tmp_path / "p.txt").write_text("a dog\n\n  \nan astronaut riding a horse\n")
  (tmp_path / "p.jsonl").write_text('{"caption": "a dog"}\n{"caption": ""}\n'
                                    '{"caption": "a red car", "url": "x"}\n')
  txt = webdataset.captions_source(ml_collections.ConfigDict(dict(path=str(tmp_path / "p.txt"))))
  assert txt.num_examples == 2 and txt.skipped["empty caption"] == 2
  assert txt.image_shape is None
  batch = txt.batch(0, global_batch_size=2)
  assert sorted(batch["captions"]) == ["a dog", "an astronaut riding a horse"]
  assert "images" not in batch
  js = webdataset.captions_source(ml_collections.ConfigDict(dict(path=str(tmp_path / "p.jsonl"))))
  assert js.num_examples == 2
  (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match="caption"):
    webdataset.captions_source(ml_collections.ConfigDict(dict(path=str(tmp_path / "bad.jsonl"))))


def test_webdataset_refuses_paths_without_shards(tmp_path):
  with pytest.raises(ValueError, match="no .tar shards"):
    webdataset.shard_paths(tmp_path)
  (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
  with pytest.raises(ValueError, match="not a readable tar shard"):
    webdataset.WebDatasetIndex([tmp_path / "x.tar"])


# ----------------------------------------------------------------------------
# Config.


def test_sd15_config_is_table5s_column():
  c = sd15.get_config("js")
  assert (c.batch_size, c.fake_score_update_freq, c.total_steps) == (1024, 10, 60_000)
  assert (c.loss.gan_weight, c.loss.cfg_weight) == (1e-3, 1.75)
  # The references' SD recipe (docs/t2i_settings.md): mid-block heads (8x8 at 512 px),
  # SD's own clock, FastGen's x0-MSE fake score, no EMA, R1 off (approximate form if on).
  assert tuple(c.disc.resolutions) == (sd15.MID,)
  assert (c.loss.clock, tuple(c.loss.t_fdistill), tuple(c.loss.t_fake_score),
          tuple(c.loss.t_gan)) == ("ddpm", (20, 980), (0, 999), (0, 999))
  assert (c.loss.fake_score_weighting, tuple(c.ema_decays)) == ("x0", ())
  assert (c.loss.r1_gamma, c.loss.r1_form) == (0.0, "approx")
  assert c.warm_start_advised and len(c.eval.grid_prompts) == 8      # the paper's Fig. 7
  assert c.eval.grid_prompts[:2] == ("A man putting a pan inside of an oven with his bare hand.",
                                     "A man flying a kite on the beach.")
  assert (c.optim.gen_lr, c.optim.fake_lr, c.optim.disc_lr, c.optim.weight_decay) == (
      1e-5, 1e-5, 1e-5, 1e-2)
  assert sd15.get_config("js,cfg5").loss.cfg_weight == 5.0
  for d in config_lib.DIVERGENCES:
    assert sd15.get_config(d).divergence == d
  assert sd15.get_config("rkl,no_gan").loss.gan_weight == 0
  assert sd15.get_config("js,gan_only").loss.fdistill_weight == 0
  with pytest.raises(ValueError, match="cfg7"):
    sd15.get_config("js,cfg7")


def test_captions_only_source_needs_rkl_without_gan(tmp_path):
  (tmp_path / "p.txt").write_text("a dog\n")
  c = tiny_config(**{"data.kind": "captions", "data.path": str(tmp_path / "p.txt")})
  with pytest.raises(ValueError, match="rkl,no_gan"):
    train.build_trainer(c, registry=REGISTRY)


def test_captions_only_rkl_run_leaves_the_discriminator_alone(tmp_path):
  """rkl,no_gan on prompts alone: both steps trace (jax.eval_shape: nothing compiles), the
  critic step reports no discriminator terms, and the state keeps its structure."""
  (tmp_path / "p.txt").write_text("a dog\na red car\nan astronaut riding a horse\n")
  c = ml_collections.FrozenConfigDict(tiny_config("rkl,no_gan,tiny", **{
      "data.kind": "captions", "data.path": str(tmp_path / "p.txt")}))
  trainer = train.Trainer(c, devices=jax.devices()[:1], registry=REGISTRY)
  data = trainer.models.conditioning.host(trainer.source.batch(0, global_batch_size=8))
  assert set(data) == {"tokens"} and data["tokens"].shape == (8, 77)
  kw = dict(models=trainer.models, optimizers=trainer.optimizers, config=c)
  new, metrics = jax.eval_shape(lambda s, t, d: steps.critic_step(s, t, d, **kw),
                                trainer.state, trainer.teacher_vars, data)
  assert "fake/loss" in metrics and not any(k.startswith("disc/") for k in metrics)
  assert jax.tree.structure(new) == jax.tree.structure(trainer.state)
  _, gen_metrics = jax.eval_shape(lambda s, t, d: steps.generator_step(s, t, d, **kw),
                                  trainer.state, trainer.teacher_vars, data)
  assert "gen/fdistill_loss" in gen_metrics and "gen/gan_loss" not in gen_metrics
