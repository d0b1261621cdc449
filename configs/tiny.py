r"""A tiny image run: random-weight 8x8 DDPM++ teacher, for tests and smoke runs.

  python -m fdistill_jax.main --config=configs/tiny.py:js --workdir=/tmp/tiny \
      --config.data.kind=tfds --config.data.name=...

The tests feed it an in-memory source. Same engine, losses and steps as the
CIFAR-10 and ImageNet-64 runs; only the sizes differ.
"""

from fdistill_jax import config_lib


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js")
  c = config_lib.base_config()
  c.total_steps = 4
  c.batch_size = 8
  c.fake_score_update_freq = 2
  c.ema_decays = (0.9,)
  c.loss.gan_weight = 1e-2
  c.loss.r1_gamma = 1.0
  c.loss.num_bins = 4
  c.disc.resolutions = (8, 4)
  c.disc.channels = 16
  c.teacher.kind = "random"
  c.teacher.arch = dict(
      precond="EDMPrecond", model_type="SongUNet", img_resolution=8, img_channels=3,
      label_dim=4, model_channels=16, channel_mult=[1, 2], num_blocks=1,
      attn_resolutions=[4], dropout=0.0, embedding_type="positional",
      encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
      resample_filter=[1, 1])
  c.data.kind = "memory"
  c.data.resolution = 8
  c.data.num_classes = 4
  c.data.prefetch = 1
  c.log_every = 2
  c.sample_every = 4
  c.num_sample_images = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  return config_lib.apply_variant(c, divergence, flags)
