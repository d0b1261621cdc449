r"""Runs an f-distill job: flags -> `train.loop.train_and_evaluate(config, workdir, registry)`.

The registry (every problem's teachers, data sources and evaluators) comes from
the composition root, `fdistill_jax.plugins.default_registry()`.

  python -m fdistill_jax.main --config=configs/toy2d.py:js --workdir=/tmp/toy_js
  python -m fdistill_jax.main --config=configs/imagenet64.py:js --workdir=DIR \
      --config.teacher.path=edm-imagenet-64x64-cond-adm.pkl

Any config field can be overridden with --config.FIELD=VALUE (every field:
docs/config.md; an unknown one is refused in one line naming the nearest
fields). Installed with pip, the same is `fdistill-train --config=... --workdir=...`.
On a multi-host cluster (TPU pod slice, SLURM) pass --multihost to call
jax.distributed.initialize() first; see launch/. A run stopped by SIGTERM saves
its state and exits with code 143; rerunning the same command resumes it. A bad
config, workdir, teacher or data file ends in one line `main: error: ...` and
exit code 1.
"""

import os
import sys

# TensorFlow is imported only to write TensorBoard summaries (clu); without this its
# oneDNN notice is printed on every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fdistill_jax import config_lib  # noqa: E402
from fdistill_jax import console  # noqa: E402
from fdistill_jax import plugins  # noqa: E402
from fdistill_jax.tools import cli  # noqa: E402
from fdistill_jax.train import loop  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-process runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost; "
                    "auto-detected on TPU pods and SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost; auto-detected).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost; auto-detected).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize; CPU processes talk through gloo collectives."""
  if jax.config.jax_platforms in ("cpu",) or not jax.config.jax_platforms and _cpu_only():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _cpu_only():
  import importlib.util  # pylint: disable=g-import-not-at-top
  return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "libtpu",
                                                        "jax_cuda13_plugin"))


def _config_args(argv):
  """(the --config file argument or None, [dotted names of the --config.FIELD overrides])."""
  spec, names = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg[len("--config="):]
    elif arg.startswith("--config."):
      names.append(arg[len("--config."):].split("=", 1)[0])
  return spec, names


def config_error(argv):
  """One line for a missing config file, a bad variant or an unknown --config.FIELD; or None."""
  spec, names = _config_args(argv)
  if spec is None:
    return None                       # absl says that --config is required
  try:
    config = config_lib.load_config_file(spec)
  except (OSError, ValueError) as e:
    return f"--config={spec}: {e}"
  for name in names:
    message = config_lib.unknown_field(config, name)
    if message:
      return f"--config.{name}: {message}"
  return None


def flags_help():
  """main's own flags, as --help prints them (whatever module name main runs under)."""
  module = next(m for m, fl in FLAGS.flags_by_module_dict().items() if FLAGS["workdir"] in fl)
  return FLAGS.module_help(module)


def parse_flags(argv):
  """absl's parser, after --help (the flags, exit 0) and a check of the config arguments (a
  mistake there is one line, exit 2)."""
  cli.exit_on_help(argv, __doc__, flags_help())
  message = config_error(argv)
  if message:
    print(f"fdistill_jax.main: error: {message}", file=sys.stderr)
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  console.quiet_console()
  if FLAGS.multihost:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  console.say("JAX process %d / %d, %d local / %d global devices (%s).", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count(),
              jax.devices()[0].platform)
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, registry=plugins.default_registry(),
                            foreign_ok=False)
  except loop.Preempted as e:
    console.say("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except cli.USER_ERRORS + (FloatingPointError,) as e:   # bad config, workdir, teacher, data
    print(f"main: error: {e}", file=sys.stderr)
    sys.exit(1)


def cli_main():
  """`python -m fdistill_jax.main` / the `fdistill-train` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli_main()
