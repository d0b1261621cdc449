r"""ImageNet 64x64 class-conditional, EDM ADM teacher (paper Table 5).

Teacher: edm-imagenet-64x64-cond-adm.pkl (or its converted directory).

  python -m fdistill_jax.main --config=configs/imagenet64.py:js --workdir=runs/in64_js \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl

Variants: any divergence, plus 'no_gan' / 'gan_only' ablations and 'runlocal'.
Learning rate 2e-6, dropping to 5e-7 after 200k steps (two-stage schedule).
"""

from fdistill_jax import config_lib


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js")
  c = config_lib.base_config()
  c.total_steps = 380_000
  c.batch_size = 512
  c.fake_score_update_freq = 5
  c.loss.gan_weight = 3e-3
  c.loss.r1_gamma = 0.0
  c.disc.resolutions = (8,)
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 2e-6
  c.optim.lr_decay_step = 200_000
  c.optim.lr_decay_factor = 0.25      # 2e-6 -> 5e-7
  c.optim.weight_decay = 1e-2
  c.teacher.kind = "edm"
  c.teacher.path = "edm-imagenet-64x64-cond-adm.pkl"
  c.data.kind = "tfds"
  c.data.name = "imagenet_resized/64x64"
  c.data.resolution = 64
  c.data.num_classes = 1000
  c.sample_every = 5000
  c.checkpoint_every = 5000
  if "runlocal" in flags:
    c.total_steps = 10
    c.batch_size = 4
    c.log_every = 5
    c.sample_every = 10
    c.checkpoint_every = 10
    c.num_sample_images = 4
  return config_lib.apply_variant(c, divergence, flags)
