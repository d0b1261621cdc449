r"""Runs an f-distill distillation job.

  python -m fdistill_jax.main --config=configs/toy2d.py:js --workdir=/tmp/toy_js
  python -m fdistill_jax.main --config=configs/imagenet64.py:js --workdir=DIR \
      --config.teacher.path=edm-imagenet-64x64-cond-adm.pkl

Any config field can be overridden with --config.FIELD=VALUE. On a multi-host
cluster (TPU pod slice, SLURM) pass --multihost to call
jax.distributed.initialize() first; see launch/.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fdistill_jax import train

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.multihost:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX process %d / %d, %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  config = FLAGS.config
  run = getattr(config, "run", "train")
  if run == "toy_demo":
    from fdistill_jax import toy_demo  # pylint: disable=g-import-not-at-top
    toy_demo.run(config, FLAGS.workdir)
  else:
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
