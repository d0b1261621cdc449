r"""The embedded default: distil an exact 2-D Gaussian-mixture teacher on a CPU.

  python -m fdistill_jax.main --config=configs/toy2d.py:js --workdir=/tmp/toy_js

Any of the six divergences (rkl, softened_rkl, js, squared_hellinger, fkl,
jeffreys) and the 'no_gan' / 'gan_only' ablations. Writes toy.png and
metrics.json into the workdir (the 'toy' evaluator, fdistill_jax/problems/toy/report.py).
Same engine, losses and steps as the image configs; MLP networks instead of
U-Nets, and the teacher ('toy'), data ('toy') and evaluator ('toy') come from
the registries like any other problem's.

Toy-specific choices (the rest is the paper's recipe, `config_lib.base_config`):
learning rates 1e-3, 8000 iterations, 128-wide 4-layer MLPs, one EMA of 0.999
per iteration, and GAN weight 0.3. The f-distill loss is a mean over the
elements of a batch (DMD2), so its gradient per example shrinks with the
example's size while the GAN loss's does not: the paper's 1e-3 on 3072-element
CIFAR-10 images keeps the two terms in a balance that 2-element toy samples
reach only with a weight near 1. 0.3 gave the fewest off-mode samples among
1e-2, 0.1, 0.3 and 1.5 (JS, 4000-8000 iterations, seed 0).
"""

import ml_collections

from fdistill_jax import config_lib


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js")
  c = config_lib.base_config()
  c.total_steps = 8000                 # 1600 generator updates; about 2 min on 2 CPU cores
  c.batch_size = 512
  c.fake_score_update_freq = 5         # the paper's
  c.ema_decays = (0.999,)              # per iteration: the last ~1000 iterations
  c.loss.gan_weight = 0.3              # see below
  c.loss.r1_gamma = 0.0
  c.loss.num_bins = 8
  c.disc.resolutions = (1, 3)          # feature keys: hidden layers of the teacher's MLP trunk
  c.disc.channels = 64
  c.optim.gen_lr = 1e-3
  c.optim.fake_lr = 1e-3
  c.optim.disc_lr = 1e-3
  c.optim.weight_decay = 0.0
  c.teacher.kind = "toy"
  c.toy = ml_collections.ConfigDict(dict(width=128, depth=4, fit_steps=2000, fit_batch=512,
                                         fit_seed=0))
  c.data.kind = "toy"
  c.data.mixture = "ring10"            # fdistill_jax.problems.toy.mixture.MIXTURES (teacher and data)
  c.data.resolution = 0
  c.data.num_classes = 0
  c.log_every = 100
  c.sample_every = 0
  c.eval.evaluators = ("toy",)         # metrics.json + toy.png after the last step
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  if "runlocal" in flags:
    c.total_steps = 100
    c.toy.fit_steps = 300
  return config_lib.apply_variant(c, divergence, flags)
