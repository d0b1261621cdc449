"""The two pure update steps of f-distill (paper Algorithm 1).

`generator_step` updates the one-step generator with the f-distill loss
(Eq. 4, weighted by h(r)) plus the non-saturating GAN loss; `critic_step`
updates the fake-score network (denoising loss on stop-gradient generator
samples) and the discriminator heads (GAN loss + R1), then moves the EMA copies
of the generator. The training loop runs a critic step every iteration and a
generator step every `fake_score_update_freq` iterations (DMD2's schedule).
Both are pure functions of (state, teacher_variables[, batch]); randomness is
`fold_in(state.rng, step)`, learning rates are functions of `state.step` (the
iteration). The teacher's variables are an argument and never receive
gradient. Every noise level comes from `train.noise.noise_levels` (the
teacher's own clock). The training settings and their sources (paper, FastGen,
DMD2) are tabulated in docs/image_runs.md ("Training settings") and, for SD 1.5
and SDXL, in docs/t2i_settings.md.
"""

import jax
import jax.numpy as jnp
import optax

from fdistill_jax import losses
from fdistill_jax.pipelines import sampling
from fdistill_jax.train import noise
from fdistill_jax.train import state as state_lib

GEN, CRITIC = 0, 1          # fold_in tags separating the two steps' randomness
REAL = 2                    # fold_in tag of the real branch's own randomness (VAE sampling)
R1_NOISE = 3                # fold_in tag of the approximate R1's perturbation


def _bcast(sigma, x):
  return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def generator_samples(models, gen_params, key, batch, sigma_init, sharding=None, *,
                      teacher_vars=None, data=None):
  """One-step samples of a training batch and their conditioning.

  Noise is drawn per example (`eval.sampling`: sample i uses fold_in(key, i)),
  from indices constrained to the batch sharding, so each device draws and
  generates only its own rows. The conditioning comes from the teacher's
  conditioning object (`train.conditioning`): uniform one-hot labels from the
  same per-sample keys for class-conditional teachers, this iteration's
  captions (`data`) for text-conditional ones.
  """
  indices = jnp.arange(batch, dtype=jnp.int32)
  if sharding is not None:
    indices = jax.lax.with_sharding_constraint(indices, sharding)
  noise = sampling.sample_noise(key, indices, models.sample_shape)
  labels = models.conditioning.draw(teacher_vars, key, indices, data)
  return sampling.generate(models.student, gen_params, noise, labels, sigma_init), labels


def features(models, teacher_vars, fake_params, x_t, sigma, labels, features_from):
  """(denoised_teacher, features for the heads) in one teacher pass."""
  d_teacher, feats = models.teacher.apply(teacher_vars, x_t, sigma, labels,
                                          feature_resolutions=models.feature_keys)
  if features_from == "fake_score":
    _, feats = models.student.apply({"params": fake_params}, x_t, sigma, labels,
                                    feature_resolutions=models.feature_keys)
  return d_teacher, feats


def _guided_teacher(models, teacher_vars, d_cond, x_t, sigma, labels, cfg_weight):
  """The teacher's score in Eq. 4, classifier-free guided (paper App. D: "replacing the
  teacher score in Eq. (3) with its CFG version"): D_u + w (D_c - D_u), with D_u the
  teacher under the conditioning's unconditional input (zero label, empty prompt).
  Weight 1: no guidance."""
  if cfg_weight == 1.0 or labels is None:
    return d_cond
  uncond = models.conditioning.uncond(teacher_vars, labels)
  d_uncond = models.teacher.apply(teacher_vars, x_t, sigma, uncond)
  return d_uncond + cfg_weight * (d_cond - d_uncond)


def generator_term(config):
  """The `noise.noise_levels` term of the generator's draw: its f-distill and GAN terms
  share one teacher pass, so one draw: 'fdistill', or 'gan' when that term is off."""
  return "fdistill" if config.loss.fdistill_weight > 0 else "gan"


def _ratio_clip(lc):
  """`loss.ratio_clip` as the loss module takes it: (lo, hi), or None when ()."""
  return tuple(float(v) for v in lc.ratio_clip) or None


def generator_loss(gen_params, st, teacher_vars, rng, *, models, config, sharding=None,
                   data=None):
  """Generator objective: f-distill (Eq. 4) + gan_weight * non-saturating GAN.

  `data` is this iteration's batch (its conditioning, for text teachers).
  Returns (loss, (metrics, log_ratio_ema)): the second is the updated running
  per-bin mean of stage 1 (unchanged when the f-distill term is off).
  """
  lc, batch = config.loss, config.batch_size
  k_x, k_s, k_e = jax.random.split(rng, 3)
  x, labels = generator_samples(models, gen_params, k_x, batch, lc.sigma_init, sharding,
                                teacher_vars=teacher_vars, data=data)
  sigma = noise.noise_levels(config, generator_term(config), k_s, batch)
  x_t = x + _bcast(sigma, x) * jax.random.normal(k_e, x.shape)
  d_teacher, feats = features(models, teacher_vars, st.fake, x_t, sigma, labels,
                              config.disc.features_from)
  logits = models.heads.apply({"params": st.disc}, feats)      # [B, heads]
  metrics, total, log_ratio_ema = {}, 0.0, st.log_ratio_ema
  if lc.fdistill_weight > 0:
    d_teacher = _guided_teacher(models, teacher_vars, d_teacher, x_t, sigma, labels,
                                lc.cfg_weight)
    d_fake = models.student.apply({"params": st.fake}, x_t, sigma, labels)
    fd, aux = losses.fdistill_generator_loss(
        x, d_teacher, d_fake, jnp.mean(logits, axis=-1), sigma,
        divergence=config.divergence, time_weighting=lc.time_weighting,
        normalize_ratio=lc.normalize_ratio, normalize_weight=lc.normalize_weight,
        num_bins=lc.num_bins, logit_clip=lc.logit_clip or None, ratio_clip=_ratio_clip(lc),
        ratio_ema_rate=lc.ratio_ema_rate, log_ratio_ema=st.log_ratio_ema,
        bin_ids=noise.bin_indices(config, sigma))
    log_ratio_ema = aux.pop("log_ratio_ema")
    total += lc.fdistill_weight * fd
    metrics["gen/fdistill_loss"] = fd
    metrics.update({f"fdistill/{k}": v for k, v in aux.items()})
  if lc.gan_weight > 0:
    gan = jnp.mean(losses.gan_generator_loss(logits))
    total += lc.gan_weight * gan
    metrics["gen/gan_loss"] = gan
  metrics["gen/loss"] = total
  return total, (metrics, log_ratio_ema)


def generator_step(st, teacher_vars, data=None, *, models, optimizers, config, sharding=None):
  """One generator update at iteration `st.step`; returns (new_state, metrics).

  `data`: this iteration's batch; only its conditioning is read (text teachers),
  None for teachers whose conditioning is drawn (class labels).

  The learning rate is the schedule's value at this iteration. The EMA copies
  are not touched here: they follow the generator once per iteration in
  `critic_step`.
  """
  rng = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), GEN)
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (metrics, log_ratio_ema)), grads = grad_fn(
      st.gen, st, teacher_vars, rng, models=models, config=config, sharding=sharding, data=data)
  gen_opt = state_lib.with_learning_rate(st.gen_opt, optimizers.gen_lr(st.step))
  updates, gen_opt = optimizers.gen.update(grads, gen_opt, st.gen)
  gen = optax.apply_updates(st.gen, updates)
  metrics["gen/grad_norm"] = optax.tree.norm(grads)
  metrics["lr/gen"] = state_lib.learning_rate(gen_opt)
  return st.replace(gen=gen, gen_opt=gen_opt, log_ratio_ema=log_ratio_ema), metrics


def fake_score_loss(fake_params, models, x, labels, rng, config):
  """Denoising loss of the fake score on stop-gradient generator samples.

  Noise levels: `noise.noise_levels(config, 'fake_score', ...)` (the clock's own
  draw; EDM's log-normal with `loss.fake_sigma='lognormal'`). Weighting:
  `loss.fake_score_weighting` (`losses.FAKE_SCORE_WEIGHTINGS`: EDM's lambda, or
  FastGen's unweighted x0-MSE, or DMD2's eps-MSE).
  """
  k_s, k_e, k_d = jax.random.split(rng, 3)
  sigma = noise.noise_levels(config, "fake_score", k_s, x.shape[0])
  x_t = x + _bcast(sigma, x) * jax.random.normal(k_e, x.shape)
  denoised = models.student.apply({"params": fake_params}, x_t, sigma, labels,
                                  train=True, rngs={"dropout": k_d})
  weighting = config.loss.get("fake_score_weighting", "edm")
  return jnp.mean(losses.fake_score_loss(denoised, x, sigma, weighting=weighting))


def _noised(rng, x, config):
  """(x + sigma eps, sigma), sigma the 'gan' term's noise level (`noise.noise_levels`)."""
  k_s, k_e = jax.random.split(rng)
  sigma = noise.noise_levels(config, "gan", k_s, x.shape[0])
  return x + _bcast(sigma, x) * jax.random.normal(k_e, x.shape), sigma


def disc_loss(disc_params, fake_params, models, teacher_vars, real, real_labels, fake,
              fake_labels, rng, config):
  """Non-saturating GAN loss of the heads, plus an R1 penalty on real inputs.

  R1 (`loss.r1_gamma` > 0, `loss.r1_form`): 'exact' adds (r1_gamma / 2) *
  ||d logit / d x_t||^2 (a second backward pass through the feature network;
  the EDM configs); 'approx' adds r1_gamma * mean((l(x_t) - l(x_t + alpha n))^2),
  alpha = `loss.r1_alpha` (FastGen's `gan_r1_reg_weight` / `gan_r1_reg_alpha`).

  Real and generated batches get independent noise levels and noise (DMD2,
  FastGen `gan_use_same_t_noise=False`). With `disc.features_from='fake_score'`
  the features depend on `fake_params`, so this loss also has a gradient for
  the fake score's encoder (DMD2's setup; `critic_step` applies it).
  """
  k_real, k_fake = jax.random.split(rng)
  real_t, real_sigma = _noised(k_real, real, config)
  fake_t, fake_sigma = _noised(k_fake, fake, config)
  def feats(x_t, sigma, labels):
    return features(models, teacher_vars, fake_params, x_t, sigma, labels,
                    config.disc.features_from)[1]
  l_real = models.heads.apply({"params": disc_params}, feats(real_t, real_sigma, real_labels))
  l_fake = models.heads.apply({"params": disc_params}, feats(fake_t, fake_sigma, fake_labels))
  gan = jnp.mean(losses.gan_discriminator_loss(l_real, l_fake))
  metrics = {"disc/gan_loss": gan, "disc/real_logit": jnp.mean(l_real),
             "disc/fake_logit": jnp.mean(l_fake)}
  loss = gan
  lc = config.loss
  if lc.r1_gamma > 0 and lc.get("r1_form", "exact") == "approx":
    n = jax.random.normal(jax.random.fold_in(rng, R1_NOISE), real_t.shape)
    l_pert = models.heads.apply({"params": disc_params},
                                feats(real_t + lc.r1_alpha * n, real_sigma, real_labels))
    r1 = jnp.mean(losses.approx_r1_penalty(l_real, l_pert))
    loss += lc.r1_gamma * r1
    metrics["disc/r1_approx"] = r1
  elif lc.r1_gamma > 0:
    def logit_fn(x_t):
      return jnp.mean(models.heads.apply({"params": disc_params},
                                         feats(x_t, real_sigma, real_labels)), -1)
    r1 = jnp.mean(losses.r1_penalty(logit_fn, real_t))
    loss += 0.5 * lc.r1_gamma * r1
    metrics["disc/r1"] = r1
  metrics["disc/loss"] = loss
  return loss, metrics


def _critic_grads(st, models, teacher_vars, x, fake_labels, batch, rng, config):
  """(fake-score loss, its gradient, discriminator gradient or None, metrics).

  The discriminator gradient is None when the source has no real samples
  (a captions-only source): the heads then stay as they are.
  """
  k_f, k_d = jax.random.split(rng)
  f_loss, f_grads = jax.value_and_grad(fake_score_loss)(st.fake, models, x, fake_labels, k_f,
                                                        config)
  real = models.conditioning.real(teacher_vars, jax.random.fold_in(rng, REAL), batch)
  if real is None:
    return f_loss, f_grads, None, {}
  real, real_labels = real
  args = (models, teacher_vars, real, real_labels, x, fake_labels, k_d, config)
  w = config.disc.fake_score_gan_weight
  if config.disc.features_from == "fake_score" and w > 0:
    (_, metrics), (d_grads, gan_grads) = jax.value_and_grad(disc_loss, argnums=(0, 1),
                                                            has_aux=True)(st.disc, st.fake, *args)
    f_grads = jax.tree.map(lambda a, b: a + w * b, f_grads, gan_grads)
  else:
    (_, metrics), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
        st.disc, jax.lax.stop_gradient(st.fake), *args)
  return f_loss, f_grads, d_grads, metrics


def critic_step(st, teacher_vars, batch, *, models, optimizers, config, sharding=None):
  """One fake-score and one discriminator update, then the EMA; returns (state, metrics).

  This runs every iteration, after that iteration's generator update if any,
  so the EMA copies move once per iteration with per-iteration decays.
  """
  rng = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), CRITIC)
  k_x, k_c = jax.random.split(rng)
  x, fake_labels = generator_samples(models, st.gen, k_x, config.batch_size,
                                     config.loss.sigma_init, sharding,
                                     teacher_vars=teacher_vars, data=batch)
  x = jax.lax.stop_gradient(x)
  f_loss, f_grads, d_grads, metrics = _critic_grads(st, models, teacher_vars, x, fake_labels,
                                                    batch, k_c, config)
  fake_opt = state_lib.with_learning_rate(st.fake_opt, optimizers.fake_lr(st.step))
  f_updates, fake_opt = optimizers.fake.update(f_grads, fake_opt, st.fake)
  metrics.update({"fake/loss": f_loss, "fake/grad_norm": optax.tree.norm(f_grads),
                  "lr/fake": state_lib.learning_rate(fake_opt)})
  new = st.replace(step=st.step + 1,
                   fake=optax.apply_updates(st.fake, f_updates), fake_opt=fake_opt,
                   ema=state_lib.update_ema(st.ema, st.gen, config.ema_decays))
  if d_grads is not None:
    disc_opt = state_lib.with_learning_rate(st.disc_opt, optimizers.disc_lr(st.step))
    d_updates, disc_opt = optimizers.disc.update(d_grads, disc_opt, st.disc)
    metrics.update({"disc/grad_norm": optax.tree.norm(d_grads),
                    "lr/disc": state_lib.learning_rate(disc_opt)})
    new = new.replace(disc=optax.apply_updates(st.disc, d_updates), disc_opt=disc_opt)
  return new, metrics
