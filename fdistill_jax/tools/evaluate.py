r"""FID, precision and recall of samples; reference statistics from real images.

  python -m fdistill_jax.tools.evaluate --samples=samples.npz --ref=cifar10-32x32.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth
  python -m fdistill_jax.tools.evaluate --ref_from=tfds:cifar10 --ref_out=cifar10-32x32.npz \
      --inception=inception-2015-12-05.pkl --save_features

It prints (stdout) and writes JSON (FID; precision and recall when the reference
has features, i.e. real images or a --save_features npz); progress lines go to
stderr. See `fdistill_jax.metrics.fid`.
"""

import json
import pathlib
import sys

from absl import flags

from fdistill_jax import console
from fdistill_jax.metrics import fid
from fdistill_jax.io import atomic
from fdistill_jax.loaders import inception as inception_weights
from fdistill_jax.models import inception
from fdistill_jax.tools import cli

FLAGS = cli.new_flags()
flags.DEFINE_string("samples", None, "samples.npz ('images' uint8 NHWC) or a folder of PNGs.", flag_values=FLAGS)
flags.DEFINE_string("ref", None, "EDM statistics npz (mu, sigma[, features]) or real images "
                    "(folder, images npz, tfds:NAME[:SPLIT]); features enable precision/recall.", flag_values=FLAGS)
flags.DEFINE_string("inception", None,
                    f"Inception weights: {inception_weights.SUPPORTED_FORMATS}; 'random' for "
                    "tests.", flag_values=FLAGS)
flags.DEFINE_string("ref_from", None, "Compute reference statistics from a folder, an images "
                    "npz or tfds:NAME[:SPLIT].", flag_values=FLAGS)
flags.DEFINE_string("ref_out", None, "Where --ref_from writes its EDM-format npz.", flag_values=FLAGS)
flags.DEFINE_bool("save_features", False, "--ref_from also stores the features.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output (default: next to --samples).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out / --ref_out file (never an "
                  "input).", flag_values=FLAGS)
flags.DEFINE_enum("preprocessing", "tf", sorted(inception.PREPROCESSING),
                  "tf: EDM's / the original FID's; pytorch_fid: pytorch-fid's.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "Images per Inception batch.", flag_values=FLAGS)
flags.DEFINE_integer("k", 3, "Neighbourhood size for precision/recall.", flag_values=FLAGS)
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"],
                  "sqrtm: EDM / pytorch-fid; eigh: equivalent and faster.", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", None, "Use only the first N samples.", flag_values=FLAGS)
flags.mark_flag_as_required("inception", flag_values=FLAGS)


def main(argv):
  """Progress goes to stderr: stdout carries the JSON result."""
  with console.progress_on(sys.stderr):
    return _evaluate(argv)


def _evaluate(argv):
  del argv
  if FLAGS.ref_from:
    if not FLAGS.ref_out:
      raise ValueError("--ref_from needs --ref_out=PATH.npz for the statistics.")
    atomic.check_output_file(FLAGS.ref_out, overwrite=FLAGS.overwrite, what="--ref_out",
                             inputs=[FLAGS.ref_from, FLAGS.inception])
    feature_fn = fid.load_feature_fn(FLAGS.inception, FLAGS.preprocessing)
    stats = fid.reference_from_images(FLAGS.ref_from, feature_fn, FLAGS.batch_size,
                                      FLAGS.ref_out, FLAGS.save_features)
    print(json.dumps({"ref_out": FLAGS.ref_out, "num_images": len(stats["features"])}))
    return 0
  if not (FLAGS.samples and FLAGS.ref):
    raise ValueError("Give --samples and --ref (or --ref_from and --ref_out); see --help.")
  if FLAGS.num_samples is not None and FLAGS.num_samples <= 0:
    raise ValueError(f"--num_samples={FLAGS.num_samples} must be positive (or left unset for "
                     "all samples).")
  if FLAGS.batch_size <= 0 or FLAGS.k <= 0:
    raise ValueError(f"--batch_size={FLAGS.batch_size} and --k={FLAGS.k} must be positive.")
  out = FLAGS.out or str(pathlib.Path(FLAGS.samples).with_suffix("")) + "_metrics.json"
  atomic.check_output_file(out, overwrite=FLAGS.overwrite, what="--out",
                           inputs=[FLAGS.samples, FLAGS.ref, FLAGS.inception])
  result = fid.evaluate(FLAGS.samples, FLAGS.ref, FLAGS.inception, FLAGS.preprocessing,
                        FLAGS.batch_size, FLAGS.k, FLAGS.num_samples, FLAGS.fid_method)
  atomic.write_json(out, result)
  print(json.dumps(result))
  return 0


cli_main = cli.entry_point(main, "evaluate", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
