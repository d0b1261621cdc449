r"""The embedded default: distil an exact 2-D Gaussian-mixture teacher on a CPU.

  python -m fdistill_jax.main --config=configs/toy2d.py:js --workdir=/tmp/toy_js

Any of the six divergences (rkl, softened_rkl, js, squared_hellinger, fkl,
jeffreys) and the 'no_gan' / 'gan_only' ablations. Writes toy.png and
metrics.json into the workdir (see fdistill_jax/toy_demo.py). Same engine,
losses and steps as the image configs; MLP networks instead of U-Nets.
"""

import ml_collections

from configs import common


def get_config(arg="js"):
  divergence, flags = common.parse_arg(arg, default_divergence="js")
  c = common.base_config()
  c.run = "toy_demo"
  c.total_steps = 1500
  c.batch_size = 512
  c.fake_score_update_freq = 5
  c.ema_decays = (0.99,)
  c.loss.gan_weight = 1e-2
  c.loss.r1_gamma = 0.0
  c.loss.num_bins = 8
  c.disc.resolutions = (1, 3)          # hidden layers of the teacher's MLP trunk
  c.disc.channels = 64
  c.optim.gen_lr = 1e-3
  c.optim.fake_lr = 1e-3
  c.optim.disc_lr = 1e-3
  c.optim.weight_decay = 0.0
  c.teacher.kind = "toy"
  c.toy = ml_collections.ConfigDict(dict(width=128, depth=4, fit_steps=2000, fit_batch=512,
                                         fit_seed=0))
  c.data.kind = "toy"
  c.data.resolution = 0
  c.data.num_classes = 0
  c.log_every = 100
  c.sample_every = 0
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  if "runlocal" in flags:
    c.total_steps = 100
    c.toy.fit_steps = 300
  return common.apply_variant(c, divergence, flags)
