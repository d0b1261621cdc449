"""Training state: generator, fake score, discriminator heads, optimiser states, EMA.

The frozen teacher is deliberately absent: it is loaded at start, passed to the
steps as a separate argument, and never checkpointed.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during distillation, as one pytree.

  Attributes:
    step: number of completed training iterations (critic updates).
    rng: base PRNG key; per-step keys are `fold_in(rng, step)`.
    gen, fake, disc: parameters of the one-step generator, the fake-score
      network and the discriminator heads.
    gen_opt, fake_opt, disc_opt: their optax states.
    ema: generator EMA copies, a tuple aligned with `config.ema_decays`; each
      is updated once per iteration (`update_ema`), as FastGen's EMA callbacks.
    log_ratio_ema: [loss.num_bins] log of the running per-bin mean ratio of
      stage 1 (`losses.fdistill_log_weight`); zeros (means of 1) at the start.
  """
  step: jax.Array
  rng: jax.Array
  gen: Params
  fake: Params
  disc: Params
  gen_opt: Any
  fake_opt: Any
  disc_opt: Any
  ema: tuple
  log_ratio_ema: jax.Array


@flax.struct.dataclass
class Optimizers:
  """The three optax transformations and their learning-rate schedules (static).

  Each schedule maps the training iteration (`TrainState.step`) to a learning
  rate; the steps write it into the optimiser state before each update
  (`with_learning_rate`).
  """
  gen: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  fake: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  gen_lr: Callable = flax.struct.field(pytree_node=False, default=None)
  fake_lr: Callable = flax.struct.field(pytree_node=False, default=None)
  disc_lr: Callable = flax.struct.field(pytree_node=False, default=None)


def learning_rate_schedule(base_lr, optim_config):
  """lr as a function of the training iteration, not of the optimiser's update count.

  Constant, or multiplied by `lr_decay_factor` from iteration `lr_decay_step`
  on. ImageNet-64 (paper App. B) uses 2e-6 for 200k iterations, then 5e-7.
  The generator updates only every `fake_score_update_freq`-th iteration, so
  a schedule on its update count would reach 200k five times later.
  """
  if optim_config.lr_decay_step > 0:
    return optax.piecewise_constant_schedule(
        base_lr, {int(optim_config.lr_decay_step): float(optim_config.lr_decay_factor)})
  return optax.constant_schedule(base_lr)


def make_optimizer(base_lr, optim_config, clip=True):
  """AdamW with decoupled weight decay, and global-norm clipping if `clip`.

  The learning rate is an injected hyperparameter (`optax.inject_hyperparams`)
  that the steps set from the iteration (`with_learning_rate`), so the state
  records the learning rate each update actually used.
  """
  adamw = optax.inject_hyperparams(optax.adamw)(
      learning_rate=float(base_lr),
      b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
      weight_decay=optim_config.weight_decay)
  if clip and optim_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adamw)
  return adamw


def learning_rate(opt_state):
  """The learning rate of the last update, read from an `inject_hyperparams` state."""
  found = [s.hyperparams["learning_rate"]
           for s in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(s)]
  if len(found) != 1:
    raise ValueError(f"expected one inject_hyperparams state, found {len(found)}.")
  return found[0]


def with_learning_rate(opt_state, lr):
  """The optimiser state with its injected learning rate set to `lr` for the next update."""
  def set_lr(node):
    if not _is_injected(node):
      return node
    old = node.hyperparams["learning_rate"]
    return node._replace(hyperparams={**node.hyperparams,
                                      "learning_rate": jnp.asarray(lr, old.dtype)})
  return jax.tree.map(set_lr, opt_state, is_leaf=_is_injected)


def _is_injected(node):
  return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def make_optimizers(optim_config):
  """Generator, fake-score and discriminator optimisers; `grad_clip` applies to the
  generator, and to the other two only with `clip_critic` (FastGen clips the generator
  alone, DMD2 all)."""
  critic_clip = bool(optim_config.get("clip_critic", False))
  return Optimizers(gen=make_optimizer(optim_config.gen_lr, optim_config),
                    fake=make_optimizer(optim_config.fake_lr, optim_config, critic_clip),
                    disc=make_optimizer(optim_config.disc_lr, optim_config, critic_clip),
                    gen_lr=learning_rate_schedule(optim_config.gen_lr, optim_config),
                    fake_lr=learning_rate_schedule(optim_config.fake_lr, optim_config),
                    disc_lr=learning_rate_schedule(optim_config.disc_lr, optim_config))


def create_state(rng, gen_params, fake_params, disc_params, optimizers, num_ema, num_bins=10):
  """Initial state; the EMA copies start equal to the generator."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=rng,
      gen=gen_params, fake=fake_params, disc=disc_params,
      gen_opt=optimizers.gen.init(gen_params),
      fake_opt=optimizers.fake.init(fake_params),
      disc_opt=optimizers.disc.init(disc_params),
      ema=tuple(gen_params for _ in range(num_ema)),
      log_ratio_ema=jnp.zeros((num_bins,), jnp.float32))


def update_ema(ema, params, decays):
  """ema_k <- decay_k * ema_k + (1 - decay_k) * params, for each copy k.

  Called once per training iteration (in the critic step, after that
  iteration's generator update if any), so the decays are per iteration as
  in FastGen's EMA callbacks: between two generator updates k iterations
  apart, a copy moves by decay^k towards the generator.
  """
  return tuple(optax.incremental_update(params, e_k, step_size=1.0 - d)
               for e_k, d in zip(ema, decays))
