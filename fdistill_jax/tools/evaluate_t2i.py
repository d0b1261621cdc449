r"""COCO-2014 zero-shot evaluation of text-to-image samples: FID, CLIP score, in-batch similarity.

  # 1. 30k prompts, one caption per val2014 image, deterministic in --seed:
  python -m fdistill_jax.tools.evaluate_t2i --write_prompts=coco30k.txt \
      --captions=annotations/captions_val2014.json --num=30000 --seed=0
  # 2. Reference statistics of the val2014 images (same resize protocol):
  python -m fdistill_jax.tools.evaluate_t2i --make_ref=coco2014_val.npz --ref_images=val2014 \
      --inception=pt_inception-2015-12-05-6726825d.pth
  # 3. Score a samples npz (images + prompts from tools.sample_t2i / tools.sample):
  python -m fdistill_jax.tools.evaluate_t2i --samples=samples.npz --ref=coco2014_val.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --clip=CLIP-ViT-g-14 --out=metrics.json
  # In-batch similarity (DINO; several images per prompt, e.g. sample_t2i --num_per_prompt=4):
  python -m fdistill_jax.tools.evaluate_t2i --samples=samples4.npz --dino=dino-vitb8

--captions and --ref_images also take tfds:coco_captions (prepared under --data_dir; never
downloaded). The protocol (DMD2 / GigaGAN: square crop, LANCZOS 256, clean-fid bicubic 299;
CLIP score as raw cosine with "A photo depicts "; in-batch similarity as Particle Guidance)
is in `fdistill_jax.metrics.t2i.coco`, `fdistill_jax.metrics.t2i.metrics` and `fdistill_jax.metrics.t2i.dino`.
The JSON result goes to stdout and --out; progress to stderr.
"""

import json
import pathlib
import sys

from absl import flags

from fdistill_jax import console
from fdistill_jax.metrics import fid
from fdistill_jax.io import atomic
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.loaders import inception as inception_weights
from fdistill_jax.models import inception
from fdistill_jax.metrics.t2i import coco
from fdistill_jax.metrics.t2i import metrics as t2i_metrics
from fdistill_jax.tools import cli

FLAGS = cli.new_flags()
flags.DEFINE_string("samples", None, "npz with images (uint8 NHWC), prompts, prompt_index.",
                    flag_values=FLAGS)
flags.DEFINE_string("ref", None, "Reference statistics npz (from --make_ref).", flag_values=FLAGS)
flags.DEFINE_string("inception", None, f"Inception weights: {inception_weights.SUPPORTED_FORMATS}; "
                    "'random' for tests.", flag_values=FLAGS)
flags.DEFINE_string("clip", None, "transformers CLIPModel folder (config.json, weights, "
                    "tokenizer files) for the CLIP score.", flag_values=FLAGS)
flags.DEFINE_string("dino", None, "transformers ViTModel folder (facebook/dino-vitb8) for the "
                    "in-batch similarity (needs several images per prompt).", flag_values=FLAGS)
flags.DEFINE_integer("dino_batch_size", 8, "Images per DINO batch.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output (default: SAMPLES_t2i_metrics.json).",
                    flag_values=FLAGS)
flags.DEFINE_string("make_ref", None, "Write reference statistics (npz) of --ref_images.",
                    flag_values=FLAGS)
flags.DEFINE_string("ref_images", None, f"Folder of real images, or {coco.TFDS_COCO}.",
                    flag_values=FLAGS)
flags.DEFINE_string("write_prompts", None, "Write --num prompts (.txt one per line, or .jsonl "
                    "with image_id) chosen from --captions.", flag_values=FLAGS)
flags.DEFINE_string("captions", None, "captions_val2014.json, or tfds:coco_captions[:SPLITS] "
                    f"(default splits: {coco.TFDS_COCO.split(':')[-1]}, i.e. val2014).",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "tfds data_dir for tfds: inputs.", flag_values=FLAGS)
flags.DEFINE_integer("num", None, "Prompts to write (30000 in the paper) / reference images "
                     "to use (default all).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the prompt choice.", flag_values=FLAGS)
flags.DEFINE_enum("protocol", "dmd2", sorted(coco.RESIZE_PROTOCOLS), "Resize before Inception "
                  "(sd/coco.py): dmd2 = crop, LANCZOS eval_res, clean-fid bicubic 299.",
                  flag_values=FLAGS)
flags.DEFINE_integer("eval_res", coco.EVAL_RES, "Intermediate resolution (DMD2/GigaGAN: 256).",
                     flag_values=FLAGS)
flags.DEFINE_string("prefix", t2i_metrics.DMD2_PREFIX, "Text put before each prompt for the "
                    "CLIP score (DMD2's).", flag_values=FLAGS)
flags.DEFINE_enum("preprocessing", "tf", sorted(inception.PREPROCESSING),
                  "Inception input convention (tools.evaluate).", flag_values=FLAGS)
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"],
                  "sqrtm: EDM / pytorch-fid; eigh: equivalent and faster.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per network batch.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out, --make_ref or --write_prompts "
                  "file (never an input or a file of a run).", flag_values=FLAGS)


def main(argv):
  """Progress goes to stderr: stdout carries the JSON result."""
  del argv
  with console.progress_on(sys.stderr):
    modes = [m for m in ("write_prompts", "make_ref", "samples") if FLAGS[m].value]
    if len(modes) != 1:
      raise ValueError("give exactly one of --write_prompts (prompts file), --make_ref "
                       f"(reference statistics) or --samples (score); got {modes or 'none'}.")
    if FLAGS.batch_size <= 0 or (FLAGS.num is not None and FLAGS.num <= 0):
      raise ValueError(f"--batch_size={FLAGS.batch_size} and --num={FLAGS.num} must be positive.")
    result = {"write_prompts": _write_prompts, "make_ref": _make_ref, "samples": _score}[modes[0]]()
  print(json.dumps(result))
  return 0


def _check_output(path, what):
  """Never an input (samples, reference, captions, images, model folders) or a file of a run;
  an existing file only with --overwrite. Checked before any work."""
  inputs = [FLAGS.samples, FLAGS.ref, FLAGS.captions, FLAGS.ref_images, FLAGS.inception,
            FLAGS.clip, FLAGS.dino, FLAGS.data_dir]
  atomic.check_output_file(path, overwrite=FLAGS.overwrite, what=what,
                           inputs=[i for i in inputs if i and not i.startswith("tfds:")],
                           protected=ckpt_lib.is_run_workdir)


def _write_prompts():
  out = FLAGS.write_prompts
  if not FLAGS.captions or not FLAGS.num:
    raise ValueError("--write_prompts needs --captions=captions_val2014.json (or "
                     "tfds:coco_captions) and --num=N (30000 in the paper).")
  if not out.endswith((".txt", ".jsonl")):
    raise ValueError(f"--write_prompts={out}: name a .txt (one prompt per line) or .jsonl file.")
  _check_output(out, "--write_prompts")
  if FLAGS.captions.startswith("tfds:"):
    spec = FLAGS.captions if FLAGS.captions.count(":") == 2 else coco.TFDS_COCO
    pairs = coco.pairs_from_tfds(spec, FLAGS.data_dir)
  else:
    pairs = coco.pairs_from_annotations(FLAGS.captions)
  captions, image_ids = coco.choose_captions(pairs, FLAGS.num, FLAGS.seed)
  if out.endswith(".jsonl"):
    text = "".join(json.dumps({"caption": c, "image_id": i}) + "\n"
                   for c, i in zip(captions, image_ids))
  else:
    text = "".join(c + "\n" for c in captions)
  atomic.write_text(out, text)
  return {"prompts_out": out, "num": len(captions), "seed": FLAGS.seed,
          "captions": FLAGS.captions}


def _make_ref():
  if not (FLAGS.ref_images and FLAGS.inception):
    raise ValueError("--make_ref needs --ref_images=FOLDER (or tfds:coco_captions) and "
                     "--inception=WEIGHTS.")
  if not FLAGS.make_ref.endswith(".npz"):
    raise ValueError(f"--make_ref={FLAGS.make_ref}: name an .npz file.")
  _check_output(FLAGS.make_ref, "--make_ref")
  spec = FLAGS.ref_images
  if spec.startswith("tfds:") and spec.count(":") == 1:
    spec = coco.TFDS_COCO
  images = coco.image_source(spec, FLAGS.data_dir, FLAGS.num)
  feature_fn = fid.load_feature_fn(FLAGS.inception, FLAGS.preprocessing)
  t2i_metrics.reference_stats(images, feature_fn, FLAGS.make_ref, FLAGS.protocol,
                              FLAGS.eval_res, FLAGS.batch_size)
  return {"ref_out": FLAGS.make_ref, "num_images": len(images), "ref_images": FLAGS.ref_images,
          "protocol": FLAGS.protocol, "eval_res": FLAGS.eval_res}


def _score():
  if not (FLAGS.ref or FLAGS.clip or FLAGS.dino):
    raise ValueError("--samples needs --ref (with --inception) for FID, --clip for the CLIP "
                     "score and/or --dino for the in-batch similarity.")
  if FLAGS.dino_batch_size <= 0:
    raise ValueError(f"--dino_batch_size={FLAGS.dino_batch_size} must be positive.")
  out = FLAGS.out or str(pathlib.Path(FLAGS.samples).with_suffix("")) + "_t2i_metrics.json"
  _check_output(out, "--out")
  images, prompts = coco.load_samples(FLAGS.samples)     # cheap checks before any network
  metrics = t2i_metrics.T2IMetrics(
      FLAGS.ref, FLAGS.inception, FLAGS.clip, protocol=FLAGS.protocol, eval_res=FLAGS.eval_res,
      preprocessing=FLAGS.preprocessing, fid_method=FLAGS.fid_method, prefix=FLAGS.prefix,
      batch_size=FLAGS.batch_size, dino=FLAGS.dino, dino_batch_size=FLAGS.dino_batch_size)
  result = metrics(images, prompts)
  result.update(samples=FLAGS.samples, ref=FLAGS.ref, clip=FLAGS.clip,
                protocol=FLAGS.protocol, eval_res=FLAGS.eval_res, fid_method=FLAGS.fid_method,
                clip_prefix=FLAGS.prefix, dino=FLAGS.dino)
  if FLAGS.inception == fid.RANDOM_INCEPTION:
    result["inception"] = "random (tests only, NOT FID)"
  elif FLAGS.ref:
    result["inception"] = FLAGS.inception
  if FLAGS.ref:
    warning = fid.few_samples_warning(result["num_samples"])
    if warning:
      result["fid_warning"] = warning
  atomic.write_json(out, result)
  return result


cli_main = cli.entry_point(main, "evaluate_t2i", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
