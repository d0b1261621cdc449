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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.multihost:
    jax.distributed.initialize()
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
