"""The toy problem's registry entries: teacher, student spec and data source.

As with the image runs, generator and fake score start from the teacher's
network: an MLP denoiser fitted to the exact mixture denoiser
(`mixture.fit_denoiser`, seeded by `toy.fit_seed`, so the same start for every
divergence). The teacher's denoised output is exact (`networks.ExactTeacher`),
its features are the fitted MLP's hidden layers.
"""

import jax
import numpy as np

from fdistill_jax.io import limits
from fdistill_jax.models import mlp
from fdistill_jax.train import teacher as base
from fdistill_jax.problems.toy import mixture as mixture_lib


def teacher_from_config(config) -> base.Teacher:
  """`teacher.kind='toy'`: fit the MLP trunk, wrap the exact mixture teacher."""
  tc = config.toy
  mixture = mixture_lib.get_mixture(config.data.mixture)
  variables = mixture_lib.fit_denoiser(mixture, jax.random.PRNGKey(tc.fit_seed),
                                       steps=tc.fit_steps, batch=tc.fit_batch,
                                       width=tc.width, depth=tc.depth)
  trunk = mlp.ToyDenoiser(width=tc.width, depth=tc.depth)
  module, teacher_vars = mixture_lib.exact_teacher(mixture, variables, trunk)
  return base.Teacher(module=module, variables=teacher_vars, student=trunk,
                      student_params=variables["params"],
                      sample_shape=(mixture.means.shape[1],), num_classes=0,
                      spec={"kind": "toy", "width": int(tc.width), "depth": int(tc.depth),
                            "mixture": config.data.mixture},
                      identity={"kind": "toy", "mixture": config.data.mixture,
                                **{k: int(tc[k]) for k in ("fit_seed", "fit_steps", "fit_batch",
                                                           "width", "depth")}})


def student_from_spec(spec, dtype=None):
  """(ToyDenoiser, sample_shape, num_classes) from a toy generator spec."""
  del dtype  # The toy MLP computes in float32.
  what = "the toy generator spec (generator_spec.json)"
  width = limits.spec_int(spec, "width", 1, MAX_WIDTH, what)
  depth = limits.spec_int(spec, "depth", 1, MAX_DEPTH, what)
  return mlp.ToyDenoiser(width=width, depth=depth), (2,), 0


MAX_WIDTH, MAX_DEPTH = 65536, 256      # far beyond any toy MLP; a spec asking more is corrupt


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


def make_source(data_config):
  """`data.kind='toy'`: samples of the mixture `data.mixture`, seeded by `data.seed`."""
  return ToySource(mixture_lib.get_mixture(data_config.mixture), int(data_config.seed))


def plot_samples(path, x, labels, spec):
  """`tools.sample --grid` of toy samples [N, 2]: a scatter over the run's mixture."""
  del labels
  from fdistill_jax.metrics import figures  # pylint: disable=g-import-not-at-top
  mixture = mixture_lib.get_mixture((spec or {}).get("mixture", "ring10"))
  return figures.plot_toy(path, mixture, {"one-step samples": x}, title="toy generator")
