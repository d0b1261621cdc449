"""The training engine: state, steps, the sharded loop, and the workdir's checkpoints.

  from fdistill_jax.train import loop
  loop.train_and_evaluate(config, workdir)

  from fdistill_jax.train import noise_levels    # the noise levels a run's terms draw

`state` (TrainState, optimisers, EMA), `steps` (the two pure jitted steps),
`noise` (noise levels and stage-1 bins on the teacher's clock), `models` (the
run's networks), `loop` (mesh, Trainer, the loop), `checkpoint` (sole owner of
the workdir layout), `console` (progress display and log file).

`noise_levels` is `train.noise.noise_levels`, imported on first use so that
importing this package stays light.
"""


def __getattr__(name):
  if name == "noise_levels":
    from fdistill_jax.train import noise  # pylint: disable=import-outside-toplevel
    return noise.noise_levels
  raise AttributeError(f"module 'fdistill_jax.train' has no attribute {name!r}")
