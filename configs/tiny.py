r"""A tiny image run: random-weight 8x8 DDPM++ teacher, for tests and smoke runs.

From the command line, on 64 random 8x8 images written in EDM's dataset format
(a folder of PNGs plus dataset.json with labels in 0..3):

  python -m configs.tiny /tmp/tiny_data
  python -m fdistill_jax.main --config=configs/tiny.py:js --workdir=/tmp/tiny \
      --config.data.kind=edm --config.data.path=/tmp/tiny_data

The tests feed it an in-memory source instead (data.kind=memory, which only
Python can pass: `train.loop.train_and_evaluate(config, workdir, source=...)`).
Same engine, losses and steps as the CIFAR-10 and ImageNet-64 runs; only the
sizes differ. Expect a minute or two of compilation on a CPU.
"""

import json
import os
import sys

from fdistill_jax import config_lib

RESOLUTION, NUM_CLASSES = 8, 4


def write_dataset(path, num=64, seed=0):
  """`num` random RESOLUTION^2 RGB PNGs + dataset.json (EDM's format) in folder `path`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  labels = []
  for i in range(num):
    name = f"img{i:05d}.png"
    image = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    PIL.Image.fromarray(image).save(os.path.join(path, name))
    labels.append([name, i % NUM_CLASSES])
  with open(os.path.join(path, "dataset.json"), "w") as f:
    json.dump({"labels": labels}, f)
  return path


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
      precond="EDMPrecond", model_type="SongUNet", img_resolution=RESOLUTION, img_channels=3,
      label_dim=NUM_CLASSES, model_channels=16, channel_mult=[1, 2], num_blocks=1,
      attn_resolutions=[4], dropout=0.0, embedding_type="positional",
      encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
      resample_filter=[1, 1])
  c.data.kind = "memory"
  c.data.resolution = RESOLUTION
  c.data.num_classes = NUM_CLASSES
  c.data.prefetch = 1
  c.log_every = 2
  c.sample_every = 4
  c.num_sample_images = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  return config_lib.apply_variant(c, divergence, flags)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m configs.tiny OUTPUT_FOLDER")
  print(f"wrote {write_dataset(sys.argv[1])}")
