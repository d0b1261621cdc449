"""Real images end to end: the digits data, classifier and measures, EDM teacher training
(its loss, preconditioning, EMA and learning rate against independent computations), the
weight-variance analysis (Fig. 4(b)) against closed forms and Monte Carlo, the digits
sweep's bookkeeping, and one slow run: teacher -> student -> evaluation through `main`.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from fdistill_jax.models.edm import build_edm
from fdistill_jax.loaders.edm_variables import random_variables
from fdistill_jax.problems.digits import classifier as classifier_lib
from fdistill_jax.problems.digits import data
from fdistill_jax.problems.digits import report
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.metrics import weight_stats as weights
from fdistill_jax.io import atomic
from fdistill_jax.loaders import edm as edm_teachers
from fdistill_jax.problems.image import teachers as image_teachers
from fdistill_jax.tools import analysis
from fdistill_jax.tools import digits_sweep
from fdistill_jax.train import denoiser_training as edm_method
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "digits.py")


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
  """A folder holding the evaluation classifier, trained once for this module (~30 s)."""
  path = str(tmp_path_factory.mktemp("digits") / "classifier")
  classifier_lib.load_or_train(path)
  return path


@pytest.fixture(scope="module")
def clf(clf_path):
  return classifier_lib.load_or_train(clf_path)                  # read from the cache


def test_the_split_is_fixed_disjoint_and_stratified():
  idx = data.split_indices()
  train, held = idx["train"], idx["heldout"]
  assert len(train) + len(held) == 1797 and not set(train) & set(held)
  _, labels = data.load("heldout")
  assert np.all(np.abs(np.bincount(labels) - 0.2 * np.bincount(data._all_digits()[1])) <= 0.5)
  images, _ = data.load("train")
  assert images.shape == (len(train), 8, 8, 1) and images.min() == -1 and images.max() == 1
  values = np.unique(np.round((images + 1) * 8, 6))               # the 17 levels 0..16
  np.testing.assert_array_equal(values, np.arange(17))


def test_the_source_refuses_other_sizes():
  c = digits_config.get_config("js").data
  c.resolution = 16
  with pytest.raises(ValueError, match="native 8x8"):
    data.make_source(c)


@pytest.mark.slow      # trains the digits classifier (about 3 minutes on 2 cores)
@pytest.mark.xdist_group("digits_classifier")   # trained once per worker: one worker
def test_the_classifier_measure_can_fail(clf, clf_path):
  """Held-out vs train: FD small; noise and blank images: FD large, precision and
  class accuracy near zero. (Measured: FD 1.9 vs 400 for N(0, 0.5^2) noise.)"""
  ref = report.Reference(clf)
  floor = ref.floor()
  assert floor["fd"] < 5.0 and floor["precision"] > 0.8 and floor["recall"] > 0.8
  assert clf.meta["heldout_accuracy"] > 0.95
  images, labels = data.load("train")
  rng = np.random.default_rng(0)
  noise = np.clip(rng.normal(0, 0.5, images.shape), -1, 1).astype(np.float32)
  bad = ref.measure(noise, labels)
  assert bad["fd"] > 20 * floor["fd"] and bad["fd"] > 100
  assert bad["precision"] < 0.1 and bad["recall"] < 0.1 and bad["class_accuracy"] < 0.3
  # The right images with the wrong labels: the FD cannot see it, class accuracy does.
  shuffled = ref.measure(images, (labels + 1) % 10)
  assert shuffled["fd"] == pytest.approx(floor["fd"]) and shuffled["class_accuracy"] < 0.05
  # The cache holds the trained network: reading it back gives the same features.
  np.testing.assert_allclose(classifier_lib.load_or_train(clf_path).features_and_logits(
      images[:8])[0], clf.features_and_logits(images[:8])[0], rtol=1e-6)


@pytest.mark.parametrize("mu", [0.5, 1.5, 3.0])
def test_weight_variance_matches_closed_forms(mu):
  """Var_q[h] / E_q[h]^2 for q = N(0, 1), p = N(mu, 1): E_q[r^k] = exp(k (k - 1) mu^2 / 2),
  so forward KL (h = r) gives exp(mu^2) - 1, squared Hellinger (h = sqrt r / 2) exp(mu^2/4) - 1,
  Jeffreys (h = r + 1) (exp(mu^2) - 1) / 4, reverse KL 0. Tolerance 1e-9 relative."""
  v = lambda name: weights.normalized_weight_variance(name, mu)
  np.testing.assert_allclose(v("fkl"), np.expm1(mu**2), rtol=1e-9)
  np.testing.assert_allclose(v("squared_hellinger"), np.expm1(mu**2 / 4), rtol=1e-9)
  np.testing.assert_allclose(v("jeffreys"), np.expm1(mu**2) / 4, rtol=1e-9)
  assert v("rkl") == 0.0


def test_weight_variance_matches_monte_carlo_for_js():
  """JS (h = r / (r + 1)) has no closed form: 4e6 draws from q, 5 standard errors."""
  mu, n = 1.5, 4_000_000
  x = np.random.default_rng(0).normal(size=n)
  h = 1.0 / (1.0 + np.exp(-(mu * x - mu**2 / 2)))
  estimate = h.var() / h.mean() ** 2
  # delta-method standard error of var/mean^2 from the per-sample influence function
  m, v = h.mean(), h.var()
  influence = ((h - m) ** 2 - v) / m**2 - 2 * v * (h - m) / m**3
  se = influence.std() / np.sqrt(n)
  assert abs(weights.normalized_weight_variance("js", mu) - estimate) < 5 * se


def test_binned_means():
  x = np.arange(10.0)[::-1]
  xm, ym, _ = weights.binned_means(x, 2 * x, 5)
  np.testing.assert_allclose(xm, [0.5, 2.5, 4.5, 6.5, 8.5])
  np.testing.assert_allclose(ym, 2 * xm)


TINY_ARCH = dict(digits_config.ARCH, model_channels=16, channel_mult=[1], dropout=0.0)


def test_edm_loss_and_preconditioning_match_an_independent_computation():
  """`train.denoiser_training.denoising_loss` = EDM's loss, recomputed in float64 numpy from the raw
  U-Net output F: sigma = exp(P_mean + P_std n), D = c_skip y' + c_out F(c_in y'; log(sigma)/4),
  y' = y + sigma e, loss = mean_b lambda(sigma_b) mean_pixels (D - y)^2 with EDM's c_* and
  lambda (Karras et al. 2022, Table 1). Tolerance 1e-5 relative (float32 network)."""
  module = build_edm(TINY_ARCH)
  params = random_variables(module, seed=3)["params"]
  images, labels = data.load("train")
  y, c = images[:8], jax.nn.one_hot(labels[:8], 10)
  rng = jax.random.PRNGKey(7)
  loss, sigma = edm_method.denoising_loss(params, module, y, c, rng, -1.2, 1.2)

  k_sigma, k_noise, _ = jax.random.split(rng, 3)
  s = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(k_sigma, (8,)), np.float64))
  np.testing.assert_allclose(sigma, s, rtol=1e-6)
  noisy = y + s[:, None, None, None] * np.asarray(jax.random.normal(k_noise, y.shape))
  sd = 0.5
  c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2)
  c_in, c_noise = 1 / np.sqrt(s**2 + sd**2), np.log(s) / 4
  raw = np.asarray(module.model.apply({"params": params["model"]},
                                      jnp.asarray(c_in[:, None, None, None] * noisy, jnp.float32),
                                      jnp.asarray(c_noise, jnp.float32), c, None), np.float64)
  denoised = c_skip[:, None, None, None] * noisy + c_out[:, None, None, None] * raw
  lam = (s**2 + sd**2) / (s * sd) ** 2
  expected = np.mean(lam * np.mean((denoised - y) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_edm_ema_and_learning_rate_follow_edm():
  """EMA decay: EDM's beta = 0.5 ** (batch / min(halflife, cur_nimg * rampup)) with
  cur_nimg = (t + 1) * batch; learning rate lr * min((t + 1) / warmup, 1)."""
  decay, rampup, batch = 0.999, 0.05, 64
  halflife_img = np.log(0.5) / np.log(decay) * batch
  for t in (0, 10, 1000, 30000):
    expected = 0.5 ** (batch / min(halflife_img, (t + 1) * batch * rampup))
    np.testing.assert_allclose(float(edm_method.ema_decay(decay, jnp.int32(t), rampup)),
                               expected, rtol=1e-5)
  assert float(edm_method.ema_decay(decay, jnp.int32(5), 0.0)) == pytest.approx(decay)
  ec = ml_collections.ConfigDict(dict(lr=2e-3, lr_warmup=100))
  opt = edm_method.make_optimizer(ec)
  p = {"w": jnp.ones(3)}
  st = opt.init(p)
  for t in range(3):
    _, st = opt.update({"w": jnp.ones(3)}, st, p)
    np.testing.assert_allclose(float(st.hyperparams["learning_rate"]), 2e-3 * (t + 1) / 100,
                               rtol=1e-6)


def test_a_finished_teacher_workdir_is_a_teacher_path(tmp_path):
  """What the edm method writes (WORKDIR/teacher) loads through teacher.kind='edm'."""
  module = build_edm(TINY_ARCH)
  variables = random_variables(module, seed=1)
  edm_teachers.save_converted(edm_teachers.trained_teacher_dir(tmp_path), TINY_ARCH, variables)
  c = digits_config.get_config("js")
  c.teacher.path = str(tmp_path)
  teacher = image_teachers.teacher_from_config(c)
  assert teacher.sample_shape == (8, 8, 1) and teacher.num_classes == 10
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(teacher.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.teacher.path = str(tmp_path / "nothing")
  os.makedirs(c.teacher.path)
  with pytest.raises(ValueError, match="finished method='edm' run"):
    image_teachers.teacher_from_config(c)


def test_the_digits_sweep_chains_teacher_and_students(tmp_path, monkeypatch):
  """The sweep runs the teacher once, points every student at it, reuses finished runs,
  and writes every row of the table (floor, two teacher rows, students)."""
  calls = []

  def fake_run(config, workdir, registry):
    assert registry.evaluators["digits"]       # the tool hands the engine every problem
    calls.append((config.method, config.divergence, config.teacher.path, config.seed,
                  config.loss.normalize_weight))
    row = lambda name, calls_, fd: {"name": name, "calls": calls_, "fd": fd, "precision": 0.9,
                                   "recall": 0.8, "class_accuracy": 0.95}
    rows = ([row("teacher, Heun 18 steps", 35, 2.0), row("teacher, 1 step", 1, 70.0)]
            if config.method == "edm" else [row("one-step generator", 1, 3.0 + config.seed)])
    atomic.write_json(os.path.join(workdir, report.METRICS_FILE),
                      {"rows": rows, "floor": dict(row("held-out vs train split (floor)", 0, 1.9))})
  monkeypatch.setattr(digits_sweep.loop, "train_and_evaluate", fake_run)
  args = (CONFIG, str(tmp_path), ["js", "no_gan"], ["0", "1"], 0)
  rows, dirs = digits_sweep.run_all(*args, runlocal=True)
  teacher_dir = dirs["teacher"][0]
  assert calls[0][0] == "edm" and len(calls) == 1 + 2 * 2 + 2
  assert all(c[2] == teacher_dir for c in calls[1:])
  assert [c[4] for c in calls[-2:]] == [False, False]          # fkl_unnormalised
  assert list(rows) == ["held-out vs train split (floor)", "teacher, Heun 18 steps",
                        "teacher, 1 step", "js", "no_gan", "fkl_unnormalised"]
  table = digits_sweep.markdown_table(rows, ["0", "1"])
  assert "| js | 3.500 ± 0.500 |" in table and "| teacher, 1 step | 70.000 |" in table
  assert "| FD - rkl (same seed) |" not in table          # no rkl row: no paired column
  rows["rkl"] = [dict(r, fd=r["fd"] + d) for r, d in zip(rows["js"], (0.5, 0.1))]
  paired = digits_sweep.markdown_table(rows, ["0", "1"])
  assert paired.splitlines()[0].endswith("| FD - rkl (same seed) |")
  # js - rkl per seed: -0.5 and -0.1, mean -0.3, std 0.2; the teacher rows have none.
  assert [line.rsplit("|", 2)[1].strip() for line in paired.splitlines()[2:6]] == [
      "-", "-", "-", "-0.300 ± 0.200"]
  digits_sweep.run_all(*args, runlocal=True)
  assert len(calls) == 7                                        # all reused


def test_the_digits_sweep_runs_students_in_worker_processes(tmp_path):
  """--jobs=2: every student runs in a spawned worker (not this process), results come back
  in the order of the runs, and each worker's output lands in its run's console.log."""
  runs = [(CONFIG, str(tmp_path), name, name, seed, [], True)
          for name, seed in (("js", "0"), ("js", "1"), ("no_gan", "2"))]
  results = digits_sweep._run_students(runs, 2, helpers.fake_digits_run)
  assert [r[1]["rows"][0]["fd"] for r in results] == [0.0, 1.0, 2.0]
  assert all(pid != os.getpid() for _, _, pid in results)
  for (_, _, name, _, seed, _, _), (run_dir, _, _) in zip(runs, results):
    assert f"{os.sep}{name}{os.sep}seed{seed}_" in run_dir
    with open(os.path.join(run_dir, digits_sweep.CONSOLE_LOG)) as f:
      text = f.read()
    assert f"training {name} seed {seed}" in text
    assert text.count(f"a console line of {name} seed {seed}") == 1, text   # not logged twice


def test_fig4b_and_fig5b_figures(tmp_path):
  """Fig. 4(b) from the quadrature, Fig. 5(b) from TensorBoard scalars of two runs."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  runs = {}
  for label, scale in (("normalised", 1.0), ("unnormalised", 30.0)):
    run_dir = str(tmp_path / label)
    writer = metric_writers.create_default_writer(run_dir)
    for step in (50, 100, 150):
      writer.write_scalars(step, {analysis.LOSS_TAG: scale * (1 + 0.1 * step / 50)})
    writer.close()
    runs[label] = run_dir
  path, spread = analysis.figure5b(str(tmp_path / "f5b.png"), runs)
  assert os.path.getsize(path) > 1000 and set(spread) == set(runs)
  path, final = analysis.figure4b(str(tmp_path / "f4b.png"), 2.0, num=5)
  assert os.path.getsize(path) > 1000
  np.testing.assert_allclose(final["fkl"], np.expm1(4.0), rtol=1e-9)


def test_the_sweeps_fd_curves_come_from_each_runs_tensorboard_file(tmp_path):
  """`digits_sweep.curves` reads digits/fd of every student run (rows logging one point or
  none are left out) and `write_curves` draws them with the teacher's FD as reference."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  dirs = {"teacher": [str(tmp_path / "t")], "js": [], "no_gan": []}
  for name, points in (("js", (200, 400)), ("no_gan", (400,))):
    for seed in range(2):
      run_dir = str(tmp_path / name / str(seed))
      writer = metric_writers.create_default_writer(run_dir)
      for step in points:
        writer.write_scalars(step, {report.FD_TAG: 10.0 / step + seed})
      writer.close()
      dirs[name].append(run_dir)
  found = digits_sweep.curves(dirs)
  assert list(found) == ["js"] and list(found["js"]) == [0, 1]
  steps, fds = found["js"][1]
  np.testing.assert_array_equal(steps, [200, 400])
  np.testing.assert_allclose(fds, [1.05, 1.025], rtol=1e-6)
  rows = {"teacher, Heun 18 steps": [{"fd": 2.0}], "teacher, 1 step": [{"fd": 80.0}]}
  path = digits_sweep.write_curves(str(tmp_path / "c.png"), rows, dirs, ["0", "1"])
  assert os.path.getsize(path) > 1000
  assert digits_sweep.write_curves(str(tmp_path / "n.png"), rows, {"no_gan": dirs["no_gan"]},
                                   ["0", "1"]) is None


def test_analysis_says_when_fig5b_is_skipped(tmp_path, caplog):
  """A sweep without the 'fkl_unnormalised' row: Fig. 5(b) is skipped with one line naming
  the missing run; with both rows both curves are drawn."""
  caplog.set_level("INFO", logger="fdistill_jax.progress")
  dirs = {"js": ["/runs/js"], "fkl": ["/runs/fkl"]}
  atomic.write_json(str(tmp_path / "sweep.json"), {"run_dirs": dirs})
  fig6, loss = analysis.sweep_runs(str(tmp_path))
  assert fig6 == {"js": "/runs/js", "fkl": "/runs/fkl"} and loss == {}
  (line,) = [r.getMessage() for r in caplog.records if "Fig. 5(b)" in r.getMessage()]
  assert "skipped" in line and "'fkl_unnormalised'" in line, line
  dirs["fkl_unnormalised"] = ["/runs/u"]
  atomic.write_json(str(tmp_path / "sweep.json"), {"run_dirs": dirs})
  assert list(analysis.sweep_runs(str(tmp_path))[1].values()) == ["/runs/fkl", "/runs/u"]


def test_fig6_subtitle_keeps_a_small_effect():
  """h normalised to mean 1 moves by tenths of a percent: 0.9968 -> 1.0041 must not print as
  '1.00 / 1.00'."""
  title = analysis.panel_title("js", 0.99684, 1.00412)
  assert "0.9968 / 1.0041" in title and "+0.73%" in title, title


class _NoiseModule:
  """A stand-in 'generator' whose sample is its input noise, squashed into [-1, 1]."""

  def apply(self, variables, x, sigma, labels):
    del variables, labels
    return jnp.tanh(x / sigma[:, None, None, None])


@pytest.mark.slow      # trains the digits classifier
@pytest.mark.xdist_group("digits_classifier")   # trained once per worker: one worker
def test_the_evaluation_draws_are_the_same_for_every_run_seed(tmp_path, clf_path):
  """The 'digits' evaluator conditions sample i on the i-th train label (cyclically) and
  draws its noise from digits.eval_seed, not the run's seed: two runs with the same
  network measure exactly the same; another eval_seed measures differently."""
  from fdistill_jax.train import evaluators  # pylint: disable=g-import-not-at-top
  from fdistill_jax.pipelines import sampling  # pylint: disable=g-import-not-at-top
  made = []

  def measure(seed, eval_seed=0, num=2 * 1438 + 5):
    c = digits_config.get_config("js")
    c.seed, c.digits.classifier, c.digits.num_samples = seed, clf_path, num
    c.digits.eval_seed = eval_seed
    spec = sampling.one_step_model_sampler(_NoiseModule(), (8, 8, 1), 10, 80.0, "generator")
    make = lambda classes=None: made.append(classes) or spec.make(classes)
    ctx = evaluators.EvalContext(c, str(tmp_path), None, None, tuple(jax.devices()[:1]), None,
                                 None, str(tmp_path), (spec.__class__(
                                     spec.name, 1, "generator", spec.batch_fn, make),))
    return report.DigitsReport(ctx)({"generator": {}}, 0)

  first, other_seed = measure(0), measure(7)
  assert first == other_seed and np.isfinite(first["digits/fd"])
  assert made[0] == tuple(int(c) for c in data.load("train")[1])
  assert measure(0, eval_seed=1)["digits/fd"] != first["digits/fd"]
  saved = _read_json(os.path.join(tmp_path, report.METRICS_FILE))
  assert saved["rows"][0]["num_samples"] == 2 * 1438 + 5
  assert report.num_samples(digits_config.get_config("js")) == 4 * 1438


@pytest.mark.slow      # a teacher, then a student, each through main
@pytest.mark.xdist_group("digits_classifier")   # trained once per worker: one worker
def test_teacher_then_student_through_main(tmp_path, clf_path):
  """`python -m fdistill_jax.main` trains a CI-sized EDM teacher (configs/digits.py:
  teacher,runlocal), writes it as a converted teacher, and a JS student distilled from it
  (`--config.teacher.path=TEACHER`) ends with a classifier FD well below the teacher's own
  one-step FD. Measured on the shared 2-core CPU: teacher 1 step FD 72.0, student FD 36.1;
  asserted: student < 0.7 x teacher 1 step. Both runs are subprocesses on one CPU device,
  as a user runs them (eight simulated devices would triple the compile time)."""
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  common = [f"--config.digits.classifier={clf_path}"]
  run_main([f"--config={CONFIG}:teacher,runlocal", f"--workdir={teacher_dir}"] + common)
  assert os.path.isfile(os.path.join(teacher_dir, "teacher", "arch.json"))
  teacher = _read_json(os.path.join(teacher_dir, report.METRICS_FILE))
  assert [r["calls"] for r in teacher["rows"]] == [1]          # runlocal: no Heun row
  run_main([f"--config={CONFIG}:js,runlocal", f"--workdir={student_dir}",
            f"--config.teacher.path={teacher_dir}"] + common)
  student = _read_json(os.path.join(student_dir, report.METRICS_FILE))
  one_step_teacher, one_step_student = teacher["rows"][0]["fd"], student["rows"][0]["fd"]
  print(f"teacher 1 step FD {one_step_teacher:.2f}, student FD {one_step_student:.2f}")
  assert one_step_student < 0.7 * one_step_teacher
  assert _read_json(os.path.join(student_dir, "status.json"))["state"] == "finished"
  # Fig. 6's measurement on the trained student: h is normalised (batch mean 1).
  trainer = analysis.restore_trainer(student_dir)
  h, diff = analysis.weight_and_score_difference(trainer, 128, 1.0, 0, batch=128)
  assert h.shape == diff.shape == (128,) and np.all(np.isfinite(h)) and np.all(diff > 0)
  np.testing.assert_allclose(h.mean(), 1.0, rtol=1e-4)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def run_main(args):
  """`python -m fdistill_jax.main ARGS` on one CPU device, sharing the tests' compile cache."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  out = subprocess.run([sys.executable, "-m", "fdistill_jax.main"] + args, cwd=REPO, env=env,
                       capture_output=True, text=True, check=False, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
