r"""Throughput of the COCO metrics' parts (`fdistill_jax.metrics.t2i.metrics`), as JSON.

  python -m benchmarks.t2i_metrics --clip=tiny --batch=8 --out=/tmp/t2i_metrics.json
  python -m benchmarks.t2i_metrics --clip=vit_g14 --batch=256 --out=t2i_gpu.json   # on a GPU

Parts, images `--size` x `--size` uint8 (512: SD 1.5's samples):
  fid_resize:  the host's "dmd2" protocol (crop, LANCZOS 256, clean-fid bicubic 299) on all
               host cores (`coco.Resized`), images/s;
  clip_pixels: the host's CLIP preprocessing (crop, LANCZOS 256, bicubic 224, normalise);
  clip_towers: both CLIP towers + cosine, jitted and batch-sharded over all devices, on
               pixels and 77 tokens, random weights (`--clip`: tiny, vit_l14 = openai
               clip-vit-large-patch14, vit_g14 = laion CLIP-ViT-g-14, DMD2's); compile apart.
Inception throughput: `benchmarks.evaluate`.
"""

import os
import platform
import time

from absl import flags
import jax
import numpy as np

from benchmarks.report import time_jit, write_report
from fdistill_jax.metrics.t2i import coco
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.metrics.t2i import metrics as t2i_metrics
from fdistill_jax.tools import cli

_TEXT_L14 = {**configs.SD15_CONFIGS["text_encoder"]}
CLIPS = {
    "tiny": {"text_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                             "num_attention_heads": 4},
             "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
             "projection_dim": 16},
    "vit_l14": {"text_config": _TEXT_L14, "vision_config": configs.CLIP_VIT_L14_VISION,
                "projection_dim": 768},
    "vit_g14": {"text_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                "num_hidden_layers": 24, "num_attention_heads": 16,
                                "hidden_act": "gelu"},
                "vision_config": {"hidden_size": 1408, "intermediate_size": 6144,
                                  "num_hidden_layers": 40, "num_attention_heads": 16,
                                  "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
                "projection_dim": 1024},
}

FLAGS = cli.new_flags()
flags.DEFINE_enum("clip", "tiny", sorted(CLIPS), "CLIP size (random weights).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "Images per batch (a multiple of the devices).", flag_values=FLAGS)
flags.DEFINE_integer("size", 512, "Side of the generated images.", flag_values=FLAGS)
flags.DEFINE_integer("iters", 3, "Timed batches per part.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output.", flag_values=FLAGS)


def _host_rate(fn, images, iters):
  fn(images[:1])
  start = time.perf_counter()
  for _ in range(iters):
    fn(images)
  return len(images) * iters / (time.perf_counter() - start)


def _random_clip(name):
  cfg = CLIPS[name]
  vision = configs.vision_from_config(cfg)
  text = configs.text_with_projection_from_config(cfg)
  variables = {"vision": names.random_variables(vision), "text": names.random_variables(text, 1)}
  return t2i_metrics.Clip(vision, text, variables, None, f"random {name}")


def main(argv):
  del argv
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.size, FLAGS.size, 3),
                                             np.uint8)
  scorer = t2i_metrics.ClipScorer(_random_clip(FLAGS.clip))
  resize = coco.Resized(images, "dmd2")
  report = {"device": str(jax.devices()[0]), "num_devices": jax.device_count(),
            "host": platform.node(), "host_cores": os.cpu_count(), "clip": FLAGS.clip,
            "batch": FLAGS.batch, "size": FLAGS.size,
            "fid_resize_images_per_s": _host_rate(lambda x: resize[0:len(x)], images,
                                                  FLAGS.iters),
            "clip_pixels_images_per_s": _host_rate(scorer.pixels, images, FLAGS.iters)}
  pixels = scorer.pixels(images)
  tokens = np.full((FLAGS.batch, 77), 49407, np.int32)
  tokens[:, 0] = 49406
  compile_s, step_s, _ = time_jit(scorer.pair_cosine, (scorer.clip.variables, pixels, tokens),
                                  warmup=1, iters=FLAGS.iters)
  report.update(clip_towers_compile_s=compile_s, clip_towers_images_per_s=FLAGS.batch / step_s)
  write_report(report, FLAGS.out)


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.t2i_metrics", FLAGS, __doc__)()
