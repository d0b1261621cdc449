"""The training engine: state, steps, the sharded loop, and the workdir's checkpoints.

  from fdistill_jax import plugins
  from fdistill_jax.train import loop
  loop.train_and_evaluate(config, workdir, registry=plugins.default_registry())

  from fdistill_jax.train import noise_levels    # the noise levels a run's terms draw

`state` (TrainState, optimisers, EMA), `steps` (the two pure jitted steps),
`noise` (noise levels and stage-1 bins on the teacher's clock), `models` (the run's
networks), `loop` (mesh, Trainer, the loop), `checkpoint` (sole owner of the workdir
layout), `registry` (the `Registry` type: teachers, students, sources, evaluators, sweep
tables by config string; `fdistill_jax.plugins` builds the merged one),
`denoiser_training` (method='edm': an EDM denoiser trained from data).

`noise_levels` is `train.noise.noise_levels`, imported on first use so that
importing this package stays light.
"""


def __getattr__(name):
  if name == "noise_levels":
    from fdistill_jax.train import noise  # pylint: disable=import-outside-toplevel
    return noise.noise_levels
  raise AttributeError(f"module 'fdistill_jax.train' has no attribute {name!r}")
