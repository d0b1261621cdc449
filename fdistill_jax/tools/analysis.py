r"""The paper's analyses as figures, from trained runs (a digits sweep) and from the math.

  python -m fdistill_jax.tools.analysis --workdir=runs/digits --out=docs

reads the run directories of a digits sweep (`tools.digits_sweep`, its
sweep.json; seed of the first run of each row) and writes three PNGs:

  fig6_weight_vs_score_difference.png
      Fig. 6: for `--num_samples` (6,400) one-step samples of each trained
      student, noised at `--sigma`, the weight h(r) that student's f-distill
      loss gives each sample (r from its discriminator, after the run's
      two-stage normalisation, computed over all the samples at once) against
      the size of the score difference, the RMS over pixels of
      D_fake(x_t) - D_teacher(x_t) (= sigma^2 |s_q - s_p|): samples sorted by
      it and averaged in `--bins` equal-count bins (band: standard error).
      One panel per divergence. Does h fall where the difference is large?
  fig4b_weight_variance.png
      Fig. 4(b) / 5(a): Var_q[h(r)] / E_q[h(r)]^2 for teacher N(mu, 1) and
      student N(0, 1) as mu grows, each divergence, by quadrature
      (`eval.weights.normalized_weight_variance`).
  fig5b_loss_normalisation.png
      Fig. 5(b) / 10: the generator's f-distill loss over training (as logged
      to TensorBoard) for forward KL with and without the two-stage
      normalisation (rows 'fkl' and 'fkl_unnormalised' of the sweep).

`--runs=js=DIR,fkl=DIR2` and `--loss_runs=normalised=DIR,unnormalised=DIR2`
name runs directly instead of a sweep. A run is rebuilt from its config.json
(its teacher from the recorded teacher.path) and its newest checkpoint.
"""

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import console
from fdistill_jax import divergences
from fdistill_jax import losses
from fdistill_jax import plugins
from fdistill_jax.metrics import figures
from fdistill_jax.metrics import weight_stats as weights
from fdistill_jax.tools import cli
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop
from fdistill_jax.train import noise
from fdistill_jax.train import steps

FLAGS = cli.new_flags()
flags.DEFINE_string("workdir", None, "A digits sweep directory (reads its sweep.json).",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Where the PNGs go (default WORKDIR/figures).",
                    flag_values=FLAGS)
flags.DEFINE_list("runs", [], "NAME=RUN_DIR pairs for Fig. 6 (default: the sweep's divergence "
                  "rows).", flag_values=FLAGS)
flags.DEFINE_list("loss_runs", [], "LABEL=RUN_DIR pairs for Fig. 5(b) (default: the sweep's "
                  "'fkl' and 'fkl_unnormalised').", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 6400, "Samples per student for Fig. 6.", flag_values=FLAGS)
flags.DEFINE_float("sigma", 1.0, "Noise level of Fig. 6.", flag_values=FLAGS)
flags.DEFINE_integer("bins", 32, "Equal-count bins of Fig. 6.", flag_values=FLAGS)
flags.DEFINE_float("max_mean_difference", 4.0, "Largest mu of Fig. 4(b).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of Fig. 6's samples and noise.", flag_values=FLAGS)

FIG6, FIG4B, FIG5B = ("fig6_weight_vs_score_difference.png", "fig4b_weight_variance.png",
                      "fig5b_loss_normalisation.png")
LOSS_TAG = "gen/fdistill_loss"


def restore_trainer(run_dir):
  """The run's trainer (teacher, networks, data) with the newest checkpoint's state."""
  config = ckpt_lib.run_config(run_dir)
  trainer = loop.build_trainer(config, registry=plugins.default_registry())
  mngr = ckpt_lib.manager(run_dir, trainer.config)
  try:
    state = ckpt_lib.restore_latest(mngr, ckpt_lib.abstract(trainer.state), trainer.config)
  finally:
    mngr.close()
  if state is None:
    raise ValueError(f"{run_dir} has no readable checkpoint; train it first.")
  trainer.state = state
  return trainer


def weight_and_score_difference(trainer, num, sigma, seed, batch=640):
  """(h [num], RMS of D_fake - D_teacher [num]) for one-step samples noised at `sigma`.

  Samples come from the raw generator (the one the fake score and the
  discriminator were trained against); log r is the mean of the heads' logits,
  and h the run's weight: its divergence and normalisation flags, computed over
  all `num` samples at once (`losses.fdistill_log_weight`).
  """
  config, m = trainer.config, trainer.models
  lc = config.loss

  @jax.jit
  def one(st, teacher_vars, key):
    k_x, k_e = jax.random.split(key)
    x, labels = steps.generator_samples(m, st.gen, k_x, batch, lc.sigma_init)
    s = jnp.full((batch,), sigma, jnp.float32)
    x_t = x + sigma * jax.random.normal(k_e, x.shape)
    d_teacher, feats = steps.features(m, teacher_vars, st.fake, x_t, s, labels,
                                      config.disc.features_from)
    log_ratio = jnp.mean(m.heads.apply({"params": st.disc}, feats), axis=-1)
    d_fake = m.student.apply({"params": st.fake}, x_t, s, labels)
    diff = jnp.sqrt(jnp.mean((d_fake - d_teacher) ** 2, axis=tuple(range(1, x.ndim))))
    return log_ratio, diff

  outs = [one(trainer.state, trainer.teacher_vars, jax.random.fold_in(jax.random.PRNGKey(seed), i))
          for i in range(-(-num // batch))]
  log_ratio = jnp.concatenate([o[0] for o in outs])[:num]
  diff = np.concatenate([np.asarray(o[1]) for o in outs])[:num]
  log_h, _ = losses.fdistill_log_weight(
      log_ratio, jnp.full((num,), sigma), divergence=config.divergence,
      normalize_ratio=lc.normalize_ratio, normalize_weight=lc.normalize_weight,
      num_bins=lc.num_bins, logit_clip=lc.logit_clip or None,
      ratio_clip=tuple(lc.ratio_clip) or None, ratio_ema_rate=lc.ratio_ema_rate,
      log_ratio_ema=trainer.state.log_ratio_ema,
      bin_ids=noise.bin_indices(config, jnp.full((num,), sigma)))
  return np.exp(np.asarray(log_h, np.float64)), diff


def panel_title(name, low, high):
  """Fig. 6's panel subtitle: mean h over the lowest and highest third of score differences,
  to 4 decimals and as a relative change (h is normalised to mean 1: the effect is small)."""
  return (f"{name}: mean h, lowest / highest third {low:.4f} / {high:.4f} "
          f"({100 * (high / low - 1):+.2f}%)")


def figure6(path, runs, num, sigma, seed, num_bins):
  """Fig. 6 from {name: run dir}; returns the path and {name: Spearman-like summary}."""
  panels, summary = {}, {}
  for name, run_dir in runs.items():
    console.say("Fig. 6: %s (%s) ...", name, run_dir)
    trainer = restore_trainer(run_dir)
    h, diff = weight_and_score_difference(trainer, num, sigma, seed)
    x, y, err = weights.binned_means(diff, h, num_bins)
    third = max(1, num_bins // 3)
    summary[name] = {"h_low_difference": float(y[:third].mean()),
                     "h_high_difference": float(y[-third:].mean())}
    label = f"{trainer.config.divergence} (n={num})"
    panels[panel_title(name, y[:third].mean(), y[-third:].mean())] = {label: (x, y, err)}
  figures.plot_panels(path, panels, xlabel="score difference: RMS of D_fake - D_teacher",
                      ylabel="h(r) (normalised, batch mean 1)",
                      title=f"Fig. 6: weight vs score difference, sigma = {sigma:g}, "
                            f"{num_bins} equal-count bins (band: standard error)")
  return path, summary


def figure4b(path, max_mu, num=41):
  """Fig. 4(b) / 5(a): normalised variance of h vs the Gaussians' mean difference."""
  mus = np.linspace(0.0, max_mu, num)[1:]
  curves = {name: np.array([weights.normalized_weight_variance(name, mu) for mu in mus])
            for name in divergences.DIVERGENCES if name != "rkl"}
  figures.plot_curves(path, mus, curves, xlabel="mean difference mu (teacher N(mu, 1), "
                      "student N(0, 1))", ylabel="Var_q[h(r)] / E_q[h(r)]^2", log_y=True,
                      title="Fig. 4(b): normalised variance of the weight h(r), by quadrature "
                            "(rkl: h = 1, variance 0, not drawn)")
  return path, {name: float(v[-1]) for name, v in curves.items()}


def read_scalar(run_dir, tag):
  """(steps, values) of one scalar from a run's TensorBoard event files."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    raise ValueError(f"{run_dir} logged no {tag!r} (tags: {sorted(acc.Tags()['tensors'])[:8]} "
                     "...); is it an f-distill run with the f-distill loss on?")
  events = sorted(acc.Tensors(tag), key=lambda e: e.step)
  return (np.array([e.step for e in events]),
          np.array([float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]))


def figure5b(path, runs):
  """Fig. 5(b) / 10: the generator's f-distill loss over training, one curve per run."""
  curves, steps_seen = {}, None
  for label, run_dir in runs.items():
    steps_seen, values = read_scalar(run_dir, LOSS_TAG)
    curves[label] = values
  lengths = {len(v) for v in curves.values()}
  if len(lengths) != 1:
    raise ValueError(f"the runs logged {LOSS_TAG} at different steps ({sorted(lengths)} "
                     "points); compare runs with the same total_steps and log_every.")
  figures.plot_curves(path, steps_seen, curves, xlabel="training iteration",
                      ylabel=f"{LOSS_TAG} (mean since the previous log)", log_y=True,
                      title="Fig. 5(b): forward-KL generator loss with and without the "
                            "two-stage normalisation")
  return path, {label: float(np.std(v) / max(abs(np.mean(v)), 1e-30))
                for label, v in curves.items()}


def _pairs(items, what):
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--{what}={item!r}; expected NAME=RUN_DIR.")
    name, run_dir = item.split("=", 1)
    out[name] = run_dir
  return out


# Fig. 5(b)'s curves: (label, the digits sweep's row).
FIG5B_ROWS = (("fkl, normalised", "fkl"), ("fkl, unnormalised", "fkl_unnormalised"))


def sweep_runs(workdir):
  """({divergence row: run dir}, {loss label: run dir}) of a digits sweep (first seed)."""
  path = os.path.join(workdir, "sweep.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: run python -m fdistill_jax.tools.digits_sweep "
                            f"--workdir={workdir} first, or pass --runs / --loss_runs.")
  with open(path) as f:
    dirs = {name: runs[0] for name, runs in json.load(f)["run_dirs"].items()}
  fig6 = {d: dirs[d] for d in divergences.DIVERGENCES if d in dirs}
  missing = [k for _, k in FIG5B_ROWS if k not in dirs]
  if missing:
    console.say("Fig. 5(b) skipped: the sweep in %s has no %s run (tools.digits_sweep makes "
                "both with 'fkl' in --variants and --unnormalised; or pass --loss_runs).",
                workdir, " or ".join(repr(k) for k in missing))
    return fig6, {}
  return fig6, {label: dirs[k] for label, k in FIG5B_ROWS}


def main(argv):
  del argv
  if not FLAGS.workdir and not (FLAGS.runs or FLAGS.loss_runs):
    raise ValueError("--workdir=SWEEP_DIR (or --runs / --loss_runs and --out) is required.")
  out = FLAGS.out or os.path.join(FLAGS.workdir, "figures")
  fig6, loss = sweep_runs(FLAGS.workdir) if FLAGS.workdir else ({}, {})
  fig6 = _pairs(FLAGS.runs, "runs") or fig6
  loss = _pairs(FLAGS.loss_runs, "loss_runs") or loss
  results = {"fig4b": figure4b(os.path.join(out, FIG4B), FLAGS.max_mean_difference)[1]}
  if loss:
    results["fig5b_relative_std"] = figure5b(os.path.join(out, FIG5B), loss)[1]
  if fig6:
    results["fig6"] = figure6(os.path.join(out, FIG6), fig6, FLAGS.num_samples, FLAGS.sigma,
                              FLAGS.seed, FLAGS.bins)[1]
  print(json.dumps(results, indent=1))
  return 0


cli_main = cli.entry_point(main, "analysis", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
