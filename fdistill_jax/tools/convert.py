r"""Converts an EDM teacher into a directory the runs load fast: arch.json + orbax variables/.

  python -m fdistill_jax.tools.convert --input=edm-cifar10-32x32-cond-vp.pkl \
      --output=teachers/cifar10
  python -m fdistill_jax.tools.convert --input=state_dict.pt --arch=arch.json --output=DIR

Nothing in the file is executed (allow-list unpickler); the output appears
complete or not at all, and --overwrite only ever replaces a directory this
tool wrote. See `fdistill_jax.loaders.edm`.
"""

from absl import flags

from fdistill_jax.loaders import edm
from fdistill_jax.tools import cli

FLAGS = cli.new_flags()
flags.DEFINE_string("input", None, "Teacher file: EDM .pkl snapshot, or a state dict "
                    "(.npz, .pt, .pth, .safetensors) with --arch.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Directory to write.", flag_values=FLAGS)
flags.DEFINE_string("arch", None, "Architecture JSON (EDMPrecond kwargs) for state dicts.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an --output directory this tool wrote earlier.", flag_values=FLAGS)
flags.mark_flags_as_required(["input", "output"], flag_values=FLAGS)


def main(argv):
  del argv
  out = edm.convert(FLAGS.input, FLAGS.output, FLAGS.arch, FLAGS.overwrite)
  print(f"wrote {out}")


cli_main = cli.entry_point(main, "convert", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
