"""The training engine: state, steps, the sharded loop, and the workdir's checkpoints.

  from fdistill_jax.train import loop
  loop.train_and_evaluate(config, workdir)

`state` (TrainState, optimisers, EMA), `steps` (the two pure jitted steps),
`models` (the run's networks), `loop` (mesh, Trainer, the loop), `checkpoint`
(sole owner of the workdir layout), `console` (progress display and log file).
"""
