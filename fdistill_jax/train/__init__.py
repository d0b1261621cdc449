"""The training engine: state, steps, the sharded loop, and the workdir's checkpoints.

  from fdistill_jax import plugins
  from fdistill_jax.train import loop
  loop.train_and_evaluate(config, workdir, registry=plugins.default_registry())

`state` (TrainState, optimisers, EMA), `steps` (the two pure jitted steps),
`models` (the run's networks), `loop` (mesh, Trainer, the loop), `checkpoint`
(sole owner of the workdir layout), `registry` (the `Registry` type: teachers,
students, sources, evaluators, sweep tables by config string; `fdistill_jax.plugins`
builds the merged one), `denoiser_training` (method='edm': an EDM denoiser trained
from data).
"""
