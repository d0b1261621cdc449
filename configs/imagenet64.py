r"""ImageNet 64x64 class-conditional, EDM ADM teacher (paper Table 5 and App. B, NVIDIA
FastGen `configs/experiments/EDM/config_f_distill_in64.py` where the paper is silent).

Teacher: edm-imagenet-64x64-cond-adm.pkl (or its converted directory).

  python -m fdistill_jax.main --config=configs/imagenet64.py:js --workdir=runs/in64_js \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl

Variants: any divergence, plus 'no_gan' / 'gan_only' ablations and 'runlocal'.
Learning rate 2e-6 for 200k iterations, then 5e-7 (App. B; counted in iterations).
"""

from fdistill_jax import config_lib


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js")
  c = config_lib.base_config()
  c.total_steps = 380_000                 # iterations (FastGen runs 600k)
  c.batch_size = 512
  c.fake_score_update_freq = 5
  c.ema_decays = (0.9999, 0.99995, 0.9996)  # per iteration; ema:0 is sampled and exported
  c.student_dropout = 0.0                 # the teacher's 0.1 stays in the teacher
  c.loss.gan_weight = 3e-3
  c.loss.r1_gamma = 0.0
  c.loss.num_bins = 10
  c.loss.bin_spacing = "linear"           # equal-width bins of sigma on [0.002, 80] (FastGen)
  c.loss.logit_clip = 10.0
  c.loss.ratio_clip = (0.1, 20.0)
  c.loss.ratio_ema_rate = 0.5             # FastGen's running per-bin mean on ImageNet-64
  c.loss.fake_sigma = "karras"
  c.loss.min_index, c.loss.max_index = 2, 998
  c.disc.resolutions = (8,)
  c.disc.head = "dmd2"                    # 1 head on the 768-channel 8x8 map, 18,879,745 params
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 2e-6
  c.optim.lr_decay_step = 200_000         # iteration 200k: 2e-6 -> 5e-7
  c.optim.lr_decay_factor = 0.25
  c.optim.weight_decay = 1e-2
  c.optim.grad_clip = 10.0                # generator only (FastGen)
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
