"""The toy report: the 'toy' evaluator, its figure, and the sweep's table columns.

After the last iteration of a toy run the evaluator writes into the workdir

  toy.png        teacher density | initial generator | distilled generator |
                 log10 h(r(x)) over the plane (Theorem 1's weight at sigma = 0.1)
  metrics.json   per-mode mass vs the true weights, modes covered, k-NN
                 precision/recall, smoothed f-divergence estimates, for the
                 distilled generator and for the initial one
  toy_samples.npz  the samples those were computed on ('final', 'initial' [N, 2])

`sweep_figure` draws the runs of a sweep side by side from those files.

Measures are computed against the exact teacher (`toy.metrics`).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences
from fdistill_jax.metrics import figures
from fdistill_jax.pipelines import sampling
from fdistill_jax.io import atomic
from fdistill_jax.problems.toy import metrics as toy_metrics
from fdistill_jax.problems.toy import mixture as mixture_lib

NUM_EVAL_SAMPLES = 4096
METRICS_FILE = "metrics.json"
FIGURE_FILE = "toy.png"
SAMPLES_FILE = "toy_samples.npz"


def weight_field(models, teacher_vars, disc_params, divergence, sigma=0.1):
  """points [M, 2] -> log10 h(r(x)), r from the discriminator at noise level sigma."""
  div = divergences.get_divergence(divergence)
  @jax.jit
  def field(points):
    s = jnp.full((points.shape[0],), sigma)
    _, feats = models.teacher.apply(teacher_vars, points, s,
                                    feature_resolutions=models.feature_keys)
    logit = jnp.mean(models.heads.apply({"params": disc_params}, feats), -1)
    return div.log_h(logit) / jnp.log(10.0)
  return lambda p: np.asarray(field(jnp.asarray(p, jnp.float32)))


class ToyReport:
  """The 'toy' evaluator: metrics.json and toy.png after the last iteration."""
  every, at_end = 0, True

  def __init__(self, ctx):
    self.ctx = ctx
    self.mixture = mixture_lib.get_mixture(ctx.config.data.mixture)
    m = ctx.models
    fn = sampling.generator_batch_fn(m.student, m.sample_shape, 0, ctx.config.loss.sigma_init)
    self.sampler = sampling.BatchSampler(fn, 1024, ctx.devices)

  def samples(self, params):
    return self.sampler(params, NUM_EVAL_SAMPLES, seed=1234, what="toy samples")[0]

  def __call__(self, params, step):
    config = self.ctx.config
    final, initial = self.samples(params["generator"]), self.samples(self.ctx.initial_params)
    rng = jax.random.PRNGKey(config.seed + 7)
    result = {"divergence": config.divergence, "seed": int(config.seed), "steps": int(step),
              "final": toy_metrics.toy_metrics(self.mixture, final, rng),
              "initial": toy_metrics.toy_metrics(self.mixture, initial, rng)}
    if self.ctx.is_primary:
      atomic.write_npz(os.path.join(self.ctx.workdir, SAMPLES_FILE), final=final,
                       initial=initial)
      atomic.write_json(os.path.join(self.ctx.workdir, METRICS_FILE), result)
      field = weight_field(self.ctx.models, self.ctx.teacher_vars, params["disc"],
                           config.divergence)
      figures.plot_toy(os.path.join(self.ctx.workdir, FIGURE_FILE), self.mixture,
                       {"initial generator": initial, "distilled generator": final},
                       title=figure_title(config.divergence, result["final"]),
                       field=field, field_label="log10 h(r(x)), sigma = 0.1")
    m = result["final"]
    return {f"toy/{k}": float(m[k]) for k in SUMMARY if m.get(k) is not None}


def teacher_reference(config):
  """The exact teacher's own samples through the same measures as a run.

  NUM_EVAL_SAMPLES draws from the mixture (key fold_in(PRNGKey(seed), 99),
  independent of the k-NN reference draws, which use the evaluator's key):
  the row every distilled generator is read against (e.g. its off-mode
  fraction is 1 - P(within 3 std) = 1.1% in expectation, not 0).
  """
  mixture = mixture_lib.get_mixture(config.data.mixture)
  samples, _ = mixture.sample(jax.random.fold_in(jax.random.PRNGKey(config.seed), 99),
                              NUM_EVAL_SAMPLES)
  return toy_metrics.toy_metrics(mixture, np.asarray(samples),
                                 jax.random.PRNGKey(config.seed + 7))


SUMMARY = ("modes_covered", "off_mode_fraction", "precision", "recall", "forward_kl",
           "reverse_kl")


def figure_title(divergence, m):
  pr = ("" if m.get("precision") is None else
        f", precision {m['precision']:.2f}, recall {m['recall']:.2f}, "
        f"KL(p||q) {m['forward_kl']:.3f}, KL(q||p) {m['reverse_kl']:.3f}")
  return f"{divergence}: {m['modes_covered']}/{m['num_modes']} modes{pr}"


def sweep_figure(path, runs, config):
  """All variants side by side: the initial generator, then each run's distilled samples.

  Args:
    path: output PNG.
    runs: {variant: run directory holding toy_samples.npz and metrics.json}.
    config: the resolved config (a dict) of one of the runs (for the mixture).
  """
  mixture = mixture_lib.get_mixture(config["data"]["mixture"])
  panels = {}
  for i, (variant, run_dir) in enumerate(runs.items()):
    with np.load(os.path.join(run_dir, SAMPLES_FILE)) as data:
      if i == 0:
        panels["initial generator (all runs)"] = data["initial"]
      with open(os.path.join(run_dir, METRICS_FILE)) as f:
        m = json.load(f)["final"]
      panels[f"{variant}: {m['modes_covered']}/{m['num_modes']} modes, "
             f"KL(p||q) {m['forward_kl']:.2f}"] = data["final"]
  return figures.plot_toy_grid(
      path, mixture, panels, ncols=min(4, len(panels)),
      title=f"one-step samples after {config['total_steps']} iterations, seed "
            f"{config['seed']} (grey: teacher density)")


def _mass_over_true(k):
  """Mass captured by mode k over what the teacher's samples capture in expectation."""
  return lambda m: m["mode_mass"][k] / m["mode_mass_expected"][k]


# The sweep's table: (column, function of a run's final metrics). Modes 8 and 9 of
# the default mixture are the rare ones (weight 0.02 each): the centre and the outer.
COLUMNS = (("modes covered", lambda m: m["modes_covered"]),
           ("centre mode / true", _mass_over_true(8)),
           ("outer mode / true", _mass_over_true(9)),
           ("off-mode", lambda m: m["off_mode_fraction"]),
           ("precision", lambda m: m["precision"]),
           ("recall", lambda m: m["recall"]),
           ("KL(p||q)", lambda m: m["forward_kl"]),
           ("KL(q||p)", lambda m: m["reverse_kl"]))
