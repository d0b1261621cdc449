"""The 'edm' method: train an EDM denoiser (a teacher for f-distill) from data.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", EDM), Sec. 5 and Table 1: a clean image y with its class
label c is noised at a level drawn log-normally, log sigma ~ N(P_mean, P_std^2),
and the preconditioned denoiser D(y + sigma n; sigma, c) (`EDMPrecond`:
c_skip, c_out, c_in, c_noise) is trained to return y under the loss

  lambda(sigma) ||D(y + sigma n; sigma, c) - y||^2,
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (EDM Eq. 8),

averaged over the elements of each image (EDM sums them: a constant factor)
and over the batch, with Adam and an EMA of the weights (EDM keeps one with a
half-life ramped up over training: `ema_decay`). The network and its starting
weights come from the teacher registry like any teacher: `teacher.kind='init'`
(EDM's initialisation of `teacher.arch`), or 'edm' to continue training a
converted teacher. Runs on the same mesh, loop, checkpoints, preemption and
evaluators as distillation (`train.loop`); after the last iteration the EMA
weights are written as a converted teacher (`arch.json` + `variables/`, the
layout of `loaders.edm.save_converted`) to WORKDIR/teacher, which a
distillation run loads with `--config.teacher.path=WORKDIR`.
"""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fdistill_jax import console
from fdistill_jax import losses
from fdistill_jax.pipelines import sampling
from fdistill_jax.loaders import edm as edm_teachers
from fdistill_jax.train import conditioning as conditioning_lib
from fdistill_jax.train import models as models_lib
from fdistill_jax.train import runner
from fdistill_jax.train import state as state_lib


@flax.struct.dataclass
class EDMState:
  """The state of EDM training: step, rng, parameters, Adam state, EMA copies."""
  step: jax.Array
  rng: jax.Array
  params: state_lib.Params
  opt: object
  ema: tuple


def make_optimizer(edm_config):
  """EDM's Adam (beta 0.9 / 0.999, eps 1e-8, no weight decay); the learning rate ramps up
  linearly over the first `lr_warmup` iterations (EDM: lr_rampup_kimg), lr * min((t + 1) /
  warmup, 1) at update t, and each update records the rate it used."""
  base, warmup = float(edm_config.lr), int(edm_config.lr_warmup)
  def rate(count):
    return base * jnp.minimum((count + 1) / warmup, 1.0) if warmup > 0 else base
  return optax.inject_hyperparams(optax.adam)(learning_rate=rate, b1=0.9, b2=0.999, eps=1e-8)


def ema_decay(decay, step, rampup):
  """EDM's EMA: half-life min(h, rampup * t) iterations, h the half-life of `decay`.

  EDM (`training_loop.py`) sets ema_halflife = min(ema_halflife, cur_nimg *
  ema_rampup_ratio) and beta = 0.5 ** (batch / ema_halflife); in iterations t
  (the number done, counting this one) that is 0.5 ** (1 / min(h, rampup * t)),
  h = log 0.5 / log decay. rampup = 0 gives the fixed `decay`.
  """
  if rampup <= 0 or decay <= 0:
    return jnp.asarray(decay, jnp.float32)
  halflife = jnp.log(0.5) / jnp.log(decay)
  ramped = jnp.minimum(halflife, rampup * (step + 1).astype(jnp.float32))
  return jnp.power(0.5, 1.0 / jnp.maximum(ramped, 1e-8))


def denoising_loss(params, module, images, labels, rng, p_mean, p_std):
  """EDM's loss (`losses.fake_score_loss`, EDM Eq. 8) at log-normal noise levels; (loss, sigma)."""
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  sigma = losses.sample_sigma_lognormal(k_sigma, (images.shape[0],), p_mean, p_std)
  noise = jax.random.normal(k_noise, images.shape) * sigma.reshape((-1,) + (1,) * (images.ndim - 1))
  denoised = module.apply({"params": params}, images + noise, sigma, labels, train=True,
                          rngs={"dropout": k_drop})
  per_example = losses.fake_score_loss(denoised, images, sigma, module.sigma_data)
  return jnp.mean(per_example), sigma


def edm_step(st, batch, *, module, optimizer, config):
  """One EDM training iteration: Adam on the denoising loss, then the EMA copies."""
  rng = jax.random.fold_in(st.rng, st.step)
  labels = batch["labels"] if module.label_dim else None
  (loss, _), grads = jax.value_and_grad(denoising_loss, has_aux=True)(
      st.params, module, batch["images"], labels, rng, config.loss.p_mean, config.loss.p_std)
  updates, opt = optimizer.update(grads, st.opt, st.params)
  params = optax.apply_updates(st.params, updates)
  decays = [ema_decay(d, st.step, config.edm.ema_rampup) for d in config.ema_decays]
  ema = state_lib.update_ema(st.ema, params, decays)
  metrics = {"edm/loss": loss, "edm/grad_norm": optax.tree.norm(grads),
             "lr/edm": state_lib.learning_rate(opt)}
  if decays:
    metrics["edm/ema_decay"] = decays[0]
  return st.replace(step=st.step + 1, params=params, opt=opt, ema=ema), metrics


class EDMTrainer(runner.Runner):
  """The 'edm' method: the denoiser, its jitted step and sharded state (see `train.runner`)."""

  def __init__(self, config, source=None, devices=None, teacher=None, *, registry):
    self.config, self.registry = config, registry
    self.mesh = runner.make_mesh(config, devices)
    if teacher is None:
      teacher = runner.load_teacher(config, registry)
    self.teacher = teacher
    self.module = teacher.module
    self.arch = dict(teacher.spec["arch"]) if teacher.spec.get("kind") == "edm" else None
    if self.arch is None:
      raise ValueError(f"method='edm' trains an EDM network, but teacher.kind="
                       f"{config.teacher.kind!r} gives a {teacher.spec.get('kind')!r} network; "
                       "use teacher.kind='init' (with teacher.arch) or 'edm'.")
    self.models = models_lib.Models(
        teacher=self.module, student=self.module, heads=None, feature_keys=(),
        sample_shape=tuple(teacher.sample_shape), num_classes=int(teacher.num_classes),
        conditioning=conditioning_lib.LabelConditioning(int(teacher.num_classes),
                                                        tuple(teacher.sample_shape)))
    self.spec = teacher.spec
    self.teacher_identity = teacher.identity  # what the run starts from (resume check)
    self.teacher_vars = None                  # nothing is frozen: the network is trained
    self.initial_params = teacher.variables["params"]
    self.optimizer = make_optimizer(config.edm)
    self.source = source if source is not None else registry.source(config.data)
    self.models.conditioning.check_source(self.source, config)
    self.batch_sharding = NamedSharding(self.mesh, P(runner.BATCH_AXES))
    self._init_state(self.initial_params)
    self._compiled = set()
    step = functools.partial(edm_step, module=self.module, optimizer=self.optimizer,
                             config=config)
    self.step_fn = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                           out_shardings=(self.state_sharding, NamedSharding(self.mesh, P())),
                           donate_argnums=0)

  def _init_state(self, params):
    rng = jax.random.PRNGKey(self.config.seed)
    params = jax.device_put(params, NamedSharding(self.mesh, P()))
    num_ema = len(self.config.ema_decays)
    def init(p):
      return EDMState(step=jnp.zeros((), jnp.int32), rng=rng, params=p,
                      opt=self.optimizer.init(p), ema=tuple(p for _ in range(num_ema)))
    self.state_sharding = runner.tree_sharding(self.mesh, jax.eval_shape(init, params))
    self.state = jax.jit(init, out_shardings=self.state_sharding)(params)

  def iteration(self, step, batch):
    """One EDM training step; returns its metrics (device arrays, not synced)."""
    del step
    with self._first_call("EDM training step"):
      self.state, metrics = self.step_fn(self.state, batch)
    return metrics

  def eval_params(self):
    """'denoiser': the first EMA copy (the raw weights without EMA); 'raw'."""
    st = self.state
    return {"denoiser": st.ema[0] if st.ema else st.params, "raw": st.params}

  def samplers(self):
    """EDM's Heun sampler (`edm.sampler_steps` steps; 0: none), then one step from sigma_max."""
    out = []
    steps = int(self.config.edm.sampler_steps)
    if steps:
      kwargs = dict(num_steps=steps, sigma_max=float(self.config.loss.sigma_max),
                    sigma_min=float(self.config.loss.sigma_min))
      out.append(sampling.heun_model_sampler(self.module, kwargs, "denoiser",
                                             name=f"teacher, Heun {steps} steps"))
    out.append(sampling.one_step_model_sampler(
        self.module, self.models.sample_shape, self.models.num_classes,
        float(self.config.loss.sigma_max), "denoiser", name="teacher, 1 step"))
    return tuple(out)

  def finish(self, workdir):
    """Writes the EMA weights as a converted teacher: WORKDIR/teacher (atomic, process 0)."""
    if jax.process_index() != 0:
      return
    params = jax.tree.map(np.asarray, jax.device_get(self.eval_params()["denoiser"]))
    path = edm_teachers.trained_teacher_dir(workdir)
    edm_teachers.save_converted(path, self.arch, {"params": params}, overwrite=True)
    console.say("Teacher written to %s (distil it with --config.teacher.path=%s).", path,
                os.path.abspath(workdir))
