r"""CIFAR-10 32x32 class-conditional, EDM DDPM++ teacher (paper Table 5, NVIDIA FastGen
`configs/experiments/EDM/config_f_distill_cifar10.py` where the paper is silent).

Teacher: edm-cifar10-32x32-cond-vp.pkl (or its converted directory).

  python -m fdistill_jax.main --config=configs/cifar10.py:fkl --workdir=runs/c10_fkl \
      --config.teacher.path=/path/to/edm-cifar10-32x32-cond-vp.pkl

Variants: any divergence, plus 'no_gan' / 'gan_only' ablations and 'runlocal'.
"""

from fdistill_jax import config_lib


def get_config(arg="fkl"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="fkl")
  c = config_lib.base_config()
  c.total_steps = 60_000                  # iterations (FastGen runs 100k)
  c.batch_size = 2048
  c.fake_score_update_freq = 5
  c.ema_decays = (0.9999, 0.99995, 0.9996)  # per iteration; ema:0 is sampled and exported
  c.student_dropout = 0.0                 # the teacher's 0.13 stays in the teacher
  c.loss.gan_weight = 1e-3
  c.loss.r1_gamma = 1.0
  c.loss.num_bins = 10
  c.loss.bin_spacing = "linear"           # equal-width bins of sigma on [0.002, 80] (FastGen)
  c.loss.logit_clip = 10.0
  c.loss.ratio_clip = (0.1, 20.0)
  c.loss.ratio_ema_rate = 0.0             # FastGen: no running mean on CIFAR-10
  c.loss.fake_sigma = "karras"
  c.loss.min_index, c.loss.max_index = 2, 998
  c.disc.resolutions = (32, 16, 8)
  c.disc.head = "dmd2"                    # 3 heads, 9,444,867 parameters
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 1e-4
  c.optim.lr_decay_step = 0               # constant
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip = 10.0                # generator only (FastGen)
  c.teacher.kind = "edm"
  c.teacher.path = "edm-cifar10-32x32-cond-vp.pkl"
  c.data.kind = "tfds"
  c.data.name = "cifar10"
  c.sample_every = 2000
  c.checkpoint_every = 2000
  if "runlocal" in flags:
    _runlocal(c)
  return config_lib.apply_variant(c, divergence, flags)


def _runlocal(c):
  c.total_steps = 20
  c.batch_size = 8
  c.log_every = 5
  c.sample_every = 10
  c.checkpoint_every = 10
  c.num_sample_images = 16
