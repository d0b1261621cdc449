r"""The embedded default: distil an exact 2-D Gaussian-mixture teacher on a CPU.

  python -m fdistill_jax.main --config=configs/toy2d.py:js --workdir=/tmp/toy_js

runs the same engine, losses and train step as the image runs (no second
trainer) on MLP networks, then writes into the workdir:

  toy.png        teacher density | one-step samples | f-distill weight h over the plane
  metrics.json   per-mode mass vs the true weights, modes covered, k-NN
                 precision/recall, smoothed f-divergence estimates, for the
                 distilled generator and for the initial one

As with the image runs, generator and fake score start from the teacher's
network: an MLP denoiser fitted to the exact mixture denoiser (same seed, so
the same start for every divergence). The teacher's denoised output is exact.

`python -m fdistill_jax.toy_sweep` runs all six divergences with the same
seeds and tabulates these measures.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences
from fdistill_jax import plots
from fdistill_jax import steps
from fdistill_jax import toy
from fdistill_jax import train
from fdistill_jax.networks import mlp

NUM_EVAL_SAMPLES = 4096


def mixture_from_config(config):
  del config  # One teacher for now; the config names it for future variants.
  return toy.default_mixture()


def build_networks(config):
  """The models.TEACHERS loader for teacher.kind='toy' (see models.py)."""
  tc = config.toy
  mixture = mixture_from_config(config)
  variables = toy.fit_denoiser(mixture, jax.random.PRNGKey(tc.fit_seed), steps=tc.fit_steps,
                               batch=tc.fit_batch, width=tc.width, depth=tc.depth)
  trunk = mlp.ToyDenoiser(width=tc.width, depth=tc.depth)
  teacher, teacher_vars = toy.exact_teacher(mixture, variables, trunk)
  return teacher, teacher_vars, trunk, variables["params"], ((mixture.means.shape[1],), 0)


class ToySource:
  """Teacher samples as 'images' [B, 2]: a deterministic function of (seed, step)."""

  def __init__(self, mixture, seed):
    self.mixture, self.seed = mixture, seed
    self.num_classes, self.image_shape = 0, (2,)
    self._sample = jax.jit(lambda k, n: mixture.sample(k, n)[0], static_argnums=1)

  def batch(self, step, *, global_batch_size, process_index=0, process_count=1):
    n = global_batch_size // process_count
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    x = np.asarray(self._sample(key, global_batch_size))[process_index * n:(process_index + 1) * n]
    return {"images": x, "labels": np.zeros((n, 0), np.float32)}


def make_source(config):
  return ToySource(mixture_from_config(config), config.data.seed)


def generate_samples(trainer, params, n=NUM_EVAL_SAMPLES, seed=1234):
  noise = jax.random.normal(jax.random.PRNGKey(seed), (n,) + trainer.models.sample_shape)
  fn = jax.jit(lambda p, z: steps.generate(trainer.models, p, z, None,
                                           trainer.config.loss.sigma_init))
  return np.asarray(fn(params, noise))


def weight_field(trainer, sigma=0.1):
  """points -> log10 h(r(x)) with r from the discriminator at noise level sigma."""
  models, div = trainer.models, divergences.get_divergence(trainer.config.divergence)
  @jax.jit
  def field(points):
    s = jnp.full((points.shape[0],), sigma)
    _, feats = models.teacher.apply(trainer.teacher_vars, points, s,
                                    feature_resolutions=models.feature_keys)
    logit = jnp.mean(models.heads.apply({"params": trainer.state.disc}, feats), -1)
    return div.log_h(logit) / jnp.log(10.0)
  return lambda p: np.asarray(field(jnp.asarray(p, jnp.float32)))


def evaluate_run(trainer, initial_params, workdir):
  """Writes metrics.json and toy.png for a finished toy run; returns the metrics."""
  mixture = mixture_from_config(trainer.config)
  rng = jax.random.PRNGKey(trainer.config.seed + 7)
  st = trainer.state
  final = generate_samples(trainer, st.ema[0] if st.ema else st.gen)
  initial = generate_samples(trainer, initial_params)
  metrics = {"divergence": trainer.config.divergence, "seed": trainer.config.seed,
             "steps": int(jax.device_get(st.step)),
             "final": toy.toy_metrics(mixture, final, rng),
             "initial": toy.toy_metrics(mixture, initial, rng)}
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  m = metrics["final"]
  title = (f"{trainer.config.divergence}: {m['modes_covered']}/{m['num_modes']} modes, "
           f"precision {m['precision']:.2f}, recall {m['recall']:.2f}, "
           f"KL(p||q) {m['forward_kl']:.3f}, KL(q||p) {m['reverse_kl']:.3f}")
  plots.plot_toy(os.path.join(workdir, "toy.png"), mixture, final, title=title,
                     field=weight_field(trainer), field_label="log10 h(r), sigma=0.1")
  return metrics


def run(config, workdir):
  """The toy demo: train, then measure against the exact teacher."""
  trainer = train.build_trainer(config)
  train.run(trainer, workdir)
  metrics = evaluate_run(trainer, trainer.initial_params, workdir)
  print(json.dumps({k: metrics["final"][k] for k in
                    ("modes_covered", "precision", "recall", "forward_kl", "reverse_kl")}))
  return metrics
