"""Engine tests: every variant through main, sharding, stop-gradients, bad configs.

Networks are tiny (a 2-layer MLP on the toy teacher; an 8x8 DDPM++) so that
compilation, which dominates, stays short.
"""

import json
import os
import re
import subprocess
import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny, toy2d
from fdistill_jax import losses
from fdistill_jax import main as main_lib
from fdistill_jax import plugins
from fdistill_jax.data import registry as data_registry
from fdistill_jax.train import evaluators
from fdistill_jax.metrics import fid as fid_lib
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.train import loop as train
from fdistill_jax.train import noise
from fdistill_jax.train import steps
from tests.helpers import REPO, read_scalars, small_toy

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


def memory_source(n=32, res=8, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return data_registry.make_source(ml_collections.ConfigDict(dict(
      kind="memory", images=rng.uniform(-1, 1, (n, res, res, 3)).astype(np.float32),
      labels=rng.integers(0, classes, n), resolution=res, num_classes=classes)))


# Every divergence runs end to end once, in tests/test_toy_demo.py (400 iterations, slow
# tier); here `main` runs the loss ablations and DMD2's feature choice for 3 iterations.
VARIANTS = ([("js,no_gan", []), ("js,gan_only", [])]
            + [("fkl", ["--config.disc.features_from=fake_score"])])   # DMD2's feature choice


@pytest.mark.parametrize("variant, extra", VARIANTS)
def test_every_variant_runs_through_main(variant, extra, tmp_path):
  workdir = str(tmp_path / "run")
  argv = ["main", f"--config={REPO}/configs/toy2d.py:{variant}", f"--workdir={workdir}",
          "--config.total_steps=3", "--config.batch_size=16",
          "--config.fake_score_update_freq=2", "--config.toy.width=32", "--config.toy.depth=2",
          "--config.toy.fit_steps=20", "--config.disc.resolutions=(0,1)",
          "--config.disc.channels=16", "--config.log_every=1", "--config.checkpoint_every=0"
          ] + extra
  with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)        # config_flags reads --config.* overrides from sys.argv
    main_lib.main(["main"])
  steps_saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps_saved == ["3"], steps_saved       # the final checkpoint
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_every_metric_reaches_tensorboard_with_a_sparse_log_period(tmp_path):
  """The generator step runs every 3rd iteration and the log every 4th: the logged
  values are means since the last log, so generator and f-distill statistics appear
  at every logged step (not only when a log step happens to be a generator step)."""
  c = small_toy("js", total_steps=8, fake_score_update_freq=3, log_every=4)
  train.train_and_evaluate(c, str(tmp_path), registry=REGISTRY)
  scalars = read_scalars(tmp_path)
  for tag in ("gen/loss", "gen/fdistill_loss", "gen/grad_norm", "fdistill/h_mean",
              "fake/loss", "disc/loss", "lr/gen", "lr/fake"):
    assert [step for step, _ in scalars[tag]] == [4, 8], (tag, scalars.get(tag))
  np.testing.assert_allclose([v for _, v in scalars["lr/gen"]], c.optim.gen_lr, rtol=1e-6)
  missing = [tag for tag in scalars if not documented_tag(tag)]
  assert not missing, f"logged but not in the tag table of docs/image_runs.md: {missing}"


def documented_tags():
  """Regular expressions of the tags in docs/image_runs.md's table ("7. Watch the run").

  A cell lists names in backticks: `group/name`; `group/a_mean/std/min/max` stands for
  group/a_mean, group/a_std, ...; a bare `name` after a `group/...` one is group/name (or
  the bare name); a trailing `_k` is a bin index.
  """
  with open(os.path.join(REPO, "docs", "image_runs.md")) as f:
    text = f.read()
  rows = [line for line in text.split("| tag | what it is |", 1)[1].splitlines()[2:]
          if line.startswith("|")]
  patterns = []
  for row in rows:
    group = ""
    for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
      if "/" in name:
        group, name = name.split("/", 1)
        group += "/"
      head, *alternatives = name.split("/")
      stem = head.rsplit("_", 1)[0] + "_" if alternatives else ""
      for leaf in [head] + [stem + a for a in alternatives]:
        leaf = re.escape(leaf)
        if leaf.endswith("_k"):
          leaf = leaf[:-1] + r"\d+"
        patterns.append(f"({re.escape(group)})?{leaf}")
  return patterns


def documented_tag(tag):
  return any(re.fullmatch(p, tag) for p in documented_tags())


def test_the_tag_table_parser_expands_the_shorthands():
  for tag in ("gen/loss", "fdistill/log_ratio_std", "fdistill/h_max", "fdistill/bin_count_3",
              "steps_per_sec", "disc/r1", "digits/class_accuracy", "eval/clip_score_x100"):
    assert documented_tag(tag), tag
  for tag in ("gen/unknown", "fdistill/bin_count_x", "fdistill/log_ratio_median"):
    assert not documented_tag(tag), tag


def test_every_generator_metric_reaches_tensorboard_with_the_shipped_log_period(tmp_path):
  """configs/toy2d.py as shipped logs every 100 iterations and runs the generator step
  every 5th: in 200 iterations the logged iterations (100, 200) are never generator
  iterations (those are 0, 5, ..., 195), yet every gen/* and fdistill/* statistic must
  reach the event file at both, as the mean of the generator steps since the last log."""
  shipped = toy2d.get_config("js")
  assert (shipped.log_every, shipped.fake_score_update_freq) == (100, 5)
  c = small_toy("js", total_steps=200, log_every=shipped.log_every,
                fake_score_update_freq=shipped.fake_score_update_freq)
  c.eval.evaluators = ()
  train.train_and_evaluate(c, str(tmp_path), registry=REGISTRY)
  scalars = read_scalars(tmp_path)
  tags = sorted(t for t in scalars if t.startswith(("gen/", "fdistill/")))
  for tag in ("gen/loss", "gen/fdistill_loss", "gen/gan_loss", "gen/grad_norm",
              "fdistill/h_min", "fdistill/h_mean", "fdistill/h_max",
              "fdistill/bin_mean_ratio_0", "fdistill/bin_count_0"):
    assert tag in tags, (tag, tags)
  for tag in tags + ["fake/loss", "disc/loss"]:
    assert [step for step, _ in scalars[tag]] == [100, 200], (tag, scalars[tag])
    assert all(np.isfinite(v) for _, v in scalars[tag]), (tag, scalars[tag])


@pytest.mark.slow      # a run in a subprocess
def test_console_shows_progress_only_and_the_log_file_keeps_the_rest(tmp_path):
  """A healthy toy run, started from another directory with the config given by absolute
  path, prints a handful of progress lines (what compiles and how long it took, the
  config in one line) and no warnings; the library chatter (orbax, clu, JAX backend
  probes) and the resolved config go to the workdir's log.txt. No empty folders."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
  env.pop("TF_ENABLE_ONEDNN_OPTS", None)                 # main sets what it needs itself
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "fdistill_jax.main", f"--config={REPO}/configs/toy2d.py:js",
       f"--workdir={workdir}", "--config.total_steps=30", "--config.batch_size=16",
       "--config.toy.width=32", "--config.toy.depth=2", "--config.toy.fit_steps=20",
       "--config.disc.resolutions=(0,1)", "--config.disc.channels=16",
       "--config.checkpoint_every=10"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr == "", result.stderr[-3000:]
  lines = result.stdout.splitlines()
  duration = r"\d+(s|m\d\ds|h\d\dm)"
  pattern = re.compile(
      r"(JAX process |Building the run |Loading the teacher \(toy\) \.\.\.$"
      rf"|Teacher ready in {duration}\.$|Config: js \| 30 iterations x batch 16 "
      r"|  \(every field: config.json and log.txt|Running from step 0 of 30 "
      r"|Compiling the (generator|critic) step"
      rf"|  compiled the (generator|critic) step.* in {duration}\.$"
      rf"|First iteration done in {duration} \(compilation included\)"
      r"|step \d+/30 \(\d+%\) \| |Evaluating 'toy' at step 30|  toy/forward_kl |"
      r"Finished at step 30)")
  assert 13 <= len(lines) <= 20 and all(pattern.match(line) for line in lines), lines
  assert sum(line.startswith("Compiling the ") for line in lines) == 2, lines
  assert not any("ETA 0m" in line for line in lines), lines
  log = (workdir / "log.txt").read_text()
  assert "Saving checkpoint" in log or "orbax" in log          # orbax's INFO lines live here
  assert "First iteration done" in log
  assert "Resolved config" in log and "fake_score_update_freq: 5" in log
  assert json.loads((workdir / "status.json").read_text()) == {"state": "finished", "step": 30}
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 30
  empty = [str(p) for p in workdir.rglob("*") if p.is_dir() and not any(p.iterdir())]
  assert not empty and not (workdir / "samples").exists(), empty


def run_on(config, devices, source=None):
  config = ml_collections.FrozenConfigDict(config)
  trainer = train.Trainer(config, source, devices=devices, registry=REGISTRY)
  for step in range(config.total_steps):
    local = trainer.source.batch(step, global_batch_size=config.batch_size)
    trainer.iteration(step, trainer.to_global(local))
  return trainer, jax.device_get(trainer.state)


def test_one_device_and_eight_devices_agree():
  """The same N steps on 1 and on 8 devices give the same parameters.

  Tolerance 1e-5 relative: only the order of float32 reductions differs.
  """
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  c = small_toy("fkl", **{"loss.r1_gamma": 1.0, "total_steps": 4, "batch_size": 16})
  _, one = run_on(c, jax.devices()[:1])
  t8, eight = run_on(c, jax.devices())
  assert t8.mesh.devices.size == 8
  assert int(one.step) == int(eight.step) == 4
  for a, b in zip(jax.tree.leaves((one.gen, one.fake, one.disc, one.ema)),
                  jax.tree.leaves((eight.gen, eight.fake, eight.disc, eight.ema))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_sharding_matches_replicated():
  """Parameters sharded along 'fsdp' train to the same values as replicated ones."""
  c = small_toy("js", total_steps=2)
  _, rep = run_on(c, jax.devices())
  c.mesh.fsdp = 4
  t, sharded = run_on(c, jax.devices())
  specs = {s.spec for s in jax.tree.leaves(t.state_sharding)}
  assert any("fsdp" in tuple(spec) for spec in specs), specs
  for a, b in zip(jax.tree.leaves(rep.gen), jax.tree.leaves(sharded.gen)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow      # an EDM U-Net run
def test_tiny_image_run_keeps_teacher_unchanged(tmp_path):
  """The 8x8 DDPM++ run trains all three networks; the teacher is never touched."""
  c = tiny.get_config("js")
  c.total_steps, c.checkpoint_every = 2, 0
  c.loss.r1_gamma = 0.0      # R1 is covered on the toy; its double backward is slow to compile
  src = memory_source()
  trainer = train.build_trainer(c, src, registry=REGISTRY)
  teacher_before = jax.tree.map(np.array, jax.device_get(trainer.teacher_vars))
  gen0 = jax.tree.map(np.array, jax.device_get(trainer.state.gen))
  fake0 = jax.tree.map(np.array, jax.device_get(trainer.state.fake))
  train.run(trainer, str(tmp_path))
  st = jax.device_get(trainer.state)
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(trainer.teacher_vars)):
    np.testing.assert_array_equal(a, np.asarray(b))
  changed = lambda x, y: any(not np.array_equal(a, b) for a, b in
                             zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert changed(gen0, st.gen) and changed(fake0, st.fake)
  assert os.path.exists(os.path.join(str(tmp_path), "samples", "step_0000002.png"))


def test_generator_gradient_flows_only_through_x():
  """With the GAN term off, dL/dtheta = (dx/dtheta)^T dL/dx, where dL/dx treats the
  teacher, the fake score and the log ratio as constants (the paper's sg):
  no gradient may leak through D_teacher(x_t), D_fake(x_t) or the discriminator."""
  c = ml_collections.FrozenConfigDict(small_toy("fkl", **{"loss.gan_weight": 0.0}))
  trainer = train.Trainer(c, None, devices=jax.devices()[:1], registry=REGISTRY)
  m, st, tv = trainer.models, trainer.state, trainer.teacher_vars
  rng = jax.random.PRNGKey(3)
  grads, _ = jax.grad(steps.generator_loss, has_aux=True)(
      st.gen, st, tv, rng, models=m, config=c)

  # Independent: recompute x and the (constant) targets, differentiate the loss in x
  # alone, then pull back through the generator with a VJP.
  k_x, k_s, k_e = jax.random.split(rng, 3)
  x, vjp = jax.vjp(lambda p: steps.generator_samples(m, p, k_x, c.batch_size,
                                                     c.loss.sigma_init)[0], st.gen)
  sigma = noise.noise_levels(c, steps.generator_term(c), k_s, c.batch_size)
  x_t = x + sigma[:, None] * jax.random.normal(k_e, x.shape)
  d_t, feats = m.teacher.apply(tv, x_t, sigma, None, feature_resolutions=m.feature_keys)
  d_f = m.student.apply({"params": st.fake}, x_t, sigma, None)
  logit = jnp.mean(m.heads.apply({"params": st.disc}, feats), -1)
  lc = c.loss
  def loss_in_x(xx):
    return losses.fdistill_generator_loss(
        xx, d_t, d_f, logit, sigma, divergence="fkl", num_bins=lc.num_bins,
        logit_clip=lc.logit_clip, ratio_clip=tuple(lc.ratio_clip),
        bin_spacing=lc.bin_spacing)[0]
  expected = vjp(jax.grad(loss_in_x)(x))[0]
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 12}, "multiple of 8"),
    ({"optim.gen_lr": -1e-4}, "gen_lr"),
    ({"divergence": "kl"}, "rkl"),
    ({"disc.resolutions": (0, 7)}, "outside"),
    ({"fake_score_update_freq": 0}, "fake_score_update_freq"),
    ({"loss.min_index": 999}, "min_index"),
    ({"mesh.fsdp": 3}, "fsdp"),
    ({"ema_decays": (1.5,)}, "ema_decays"),
    ({"eval.fid_every": 10}, "eval.inception"),
])
def test_bad_config_fails_before_training(override, message):
  with pytest.raises(ValueError, match=message):
    train.build_trainer(small_toy("js", **override), registry=REGISTRY)


def test_config_variants_and_unknown_keys(tmp_path):
  with pytest.raises(ValueError, match="valid tokens"):
    toy2d.get_config("js,typo")
  with pytest.raises(ValueError, match="every loss"):
    toy2d.get_config("no_gan,gan_only")
  with pytest.raises(ValueError, match="several divergences"):
    toy2d.get_config("js,fkl")
  c = toy2d.get_config("fkl,no_gan")
  assert c.divergence == "fkl" and c.loss.gan_weight == 0.0
  argv = ["main", f"--config={REPO}/configs/toy2d.py:js", f"--workdir={tmp_path}",
          "--config.loss.no_such_key=1"]
  with (flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv),
        pytest.raises((flags.Error, AttributeError, KeyError), match="no_such_key")):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)


@pytest.mark.slow      # a run with Inception FID
def test_periodic_fid(tmp_path, caplog):
  """eval.fid_every runs inside the loop; FID against statistics of the very same
  samples (computed through eval.fid's own pipeline) is ~0, against another set it
  is not. Random-weight Inception (tests only)."""
  rng = np.random.default_rng(0)
  other = tmp_path / "other.npz"
  metrics.save_reference_stats(other, *metrics.feature_statistics(rng.normal(size=(64, 2048))))
  c = tiny.get_config("js")
  c.total_steps, c.checkpoint_every, c.loss.r1_gamma = 1, 0, 0.0
  c.eval.update(fid_every=1, num_samples=16, inception="random", ref=str(other))
  trainer = train.build_trainer(c, memory_source(), registry=REGISTRY)
  train.run(trainer, str(tmp_path / "run"))               # logs eval/fid at step 1
  ctx = evaluators.EvalContext(
      config=trainer.config, workdir=str(tmp_path), models=trainer.models,
      teacher_vars=trainer.teacher_vars, devices=tuple(jax.devices()), writer=None,
      initial_params=trainer.initial_params, samples_dir=str(tmp_path))
  with caplog.at_level("WARNING"):
    fid = evaluators.PeriodicFID(ctx)
  assert "FID of only 16 samples" in caplog.text        # said once, when the evaluator starts
  params = evaluators.as_params(trainer.state)
  images = fid.samples(params)
  assert images.shape == (16, 8, 8, 3) and images.dtype == np.uint8
  same = tmp_path / "same.npz"
  feats = fid_lib.extract_features(images, fid_lib.load_feature_fn("random"))
  metrics.save_reference_stats(same, *metrics.feature_statistics(feats))
  d_other = fid(params, 1)["eval/fid"]
  fid.ref = metrics.load_reference_stats(same)
  d_same = fid(params, 1)["eval/fid"]
  # Identical statistics: 0 up to float64 round-off of a 2048-d covariance (1e-6 of d_other).
  assert abs(d_same) < 1e-6 * d_other and d_other > 1.0, (d_same, d_other)
  scalars = read_scalars(tmp_path / "run")
  assert "eval/fid" in scalars


def test_ncsnpp_teacher_with_fourier_buffers_is_refused_clearly():
  c = tiny.get_config("js")
  c.teacher.arch.update(embedding_type="fourier", encoder_type="residual",
                        decoder_type="skip", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
  with pytest.raises(ValueError, match="not supported yet"):
    train.build_trainer(c, memory_source(), registry=REGISTRY)
