"""The two pure update steps of f-distill (paper Algorithm 1).

`generator_step` updates the one-step generator with the f-distill loss
(Eq. 4, weighted by h(r)) plus the non-saturating GAN loss; `critic_step`
updates the fake-score network (denoising loss on stop-gradient generator
samples) and the discriminator heads (GAN loss + R1). The training loop runs a
critic step every iteration and a generator step every
`fake_score_update_freq` iterations. Both are pure functions of
(state, teacher_variables[, batch]); randomness is `fold_in(state.rng, step)`.
The teacher's variables are an argument and never receive gradient.
"""

import jax
import jax.numpy as jnp
import optax

from fdistill_jax import losses
from fdistill_jax.eval import sampling
from fdistill_jax.train import state as state_lib

GEN, CRITIC = 0, 1          # fold_in tags separating the two steps' randomness


def _bcast(sigma, x):
  return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def _labels_or_none(labels):
  return labels if labels is not None and labels.shape[-1] else None


def generator_samples(models, gen_params, key, batch, sigma_init, sharding=None):
  """One-step samples of a training batch and their one-hot labels.

  Noise and labels are drawn per example (`eval.sampling`: sample i uses
  fold_in(key, i)), from indices constrained to the batch sharding, so each
  device draws and generates only its own rows.
  """
  indices = jnp.arange(batch, dtype=jnp.int32)
  if sharding is not None:
    indices = jax.lax.with_sharding_constraint(indices, sharding)
  noise = sampling.sample_noise(key, indices, models.sample_shape)
  labels = sampling.one_hot(sampling.sample_labels(key, indices, models.num_classes),
                            models.num_classes)
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
  """Classifier-free guidance on the teacher's denoiser (weight 1: none)."""
  if cfg_weight == 1.0 or labels is None:
    return d_cond
  d_uncond = models.teacher.apply(teacher_vars, x_t, sigma, jnp.zeros_like(labels))
  return d_uncond + cfg_weight * (d_cond - d_uncond)


def _karras_sigma(rng, batch, lc):
  return losses.sample_sigma_karras(
      rng, (batch,), num=lc.num_sigmas, sigma_min=lc.sigma_min, sigma_max=lc.sigma_max,
      min_index=lc.min_index, max_index=lc.max_index)


def generator_loss(gen_params, st, teacher_vars, rng, *, models, config, sharding=None):
  """Generator objective: f-distill (Eq. 4) + gan_weight * non-saturating GAN."""
  lc, batch = config.loss, config.batch_size
  k_x, k_s, k_e = jax.random.split(rng, 3)
  x, labels = generator_samples(models, gen_params, k_x, batch, lc.sigma_init, sharding)
  sigma = _karras_sigma(k_s, batch, lc)
  x_t = x + _bcast(sigma, x) * jax.random.normal(k_e, x.shape)
  d_teacher, feats = features(models, teacher_vars, st.fake, x_t, sigma, labels,
                              config.disc.features_from)
  logits = models.heads.apply({"params": st.disc}, feats)      # [B, heads]
  metrics, total = {}, 0.0
  if lc.fdistill_weight > 0:
    d_teacher = _guided_teacher(models, teacher_vars, d_teacher, x_t, sigma, labels,
                                lc.cfg_weight)
    d_fake = models.student.apply({"params": st.fake}, x_t, sigma, labels)
    fd, aux = losses.fdistill_generator_loss(
        x, d_teacher, d_fake, jnp.mean(logits, axis=-1), sigma,
        divergence=config.divergence, time_weighting=lc.time_weighting,
        normalize_ratio=lc.normalize_ratio, normalize_weight=lc.normalize_weight,
        num_bins=lc.num_bins, sigma_min=lc.sigma_min, sigma_max=lc.sigma_max,
        logit_clip=lc.logit_clip or None, ratio_clip=lc.ratio_clip or None)
    total += lc.fdistill_weight * fd
    metrics["gen/fdistill_loss"] = fd
    metrics.update({f"fdistill/{k}": v for k, v in aux.items()})
  if lc.gan_weight > 0:
    gan = jnp.mean(losses.gan_generator_loss(logits))
    total += lc.gan_weight * gan
    metrics["gen/gan_loss"] = gan
  metrics["gen/loss"] = total
  return total, metrics


def generator_step(st, teacher_vars, *, models, optimizers, config, sharding=None):
  """One generator update and EMA update; returns (new_state, metrics)."""
  rng = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), GEN)
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, metrics), grads = grad_fn(st.gen, st, teacher_vars, rng, models=models, config=config,
                                sharding=sharding)
  updates, gen_opt = optimizers.gen.update(grads, st.gen_opt, st.gen)
  gen = optax.apply_updates(st.gen, updates)
  ema = state_lib.update_ema(st.ema, gen, config.ema_decays)
  metrics["gen/grad_norm"] = optax.tree.norm(grads)
  metrics["lr/gen"] = state_lib.learning_rate(gen_opt)
  return st.replace(gen=gen, gen_opt=gen_opt, ema=ema), metrics


def fake_score_loss(fake_params, models, x, labels, rng, lc):
  """EDM denoising loss of the fake score on stop-gradient generator samples."""
  k_s, k_e, k_d = jax.random.split(rng, 3)
  sigma = losses.sample_sigma_lognormal(k_s, (x.shape[0],), p_mean=lc.p_mean, p_std=lc.p_std)
  x_t = x + _bcast(sigma, x) * jax.random.normal(k_e, x.shape)
  denoised = models.student.apply({"params": fake_params}, x_t, sigma, labels,
                                  train=True, rngs={"dropout": k_d})
  return jnp.mean(losses.fake_score_loss(denoised, x, sigma))


def disc_loss(disc_params, models, teacher_vars, fake_params, real_t, fake_t, sigma,
              real_labels, fake_labels, config):
  """Non-saturating GAN loss of the heads, plus (r1_gamma / 2) * R1 on real inputs."""
  def feats(x_t, labels):
    return features(models, teacher_vars, fake_params, x_t, sigma, labels,
                    config.disc.features_from)[1]
  f_real = jax.lax.stop_gradient(feats(real_t, real_labels))
  f_fake = jax.lax.stop_gradient(feats(fake_t, fake_labels))
  l_real = models.heads.apply({"params": disc_params}, f_real)
  l_fake = models.heads.apply({"params": disc_params}, f_fake)
  gan = jnp.mean(losses.gan_discriminator_loss(l_real, l_fake))
  metrics = {"disc/gan_loss": gan, "disc/real_logit": jnp.mean(l_real),
             "disc/fake_logit": jnp.mean(l_fake)}
  loss = gan
  if config.loss.r1_gamma > 0:
    def logit_fn(x_t):
      return jnp.mean(models.heads.apply({"params": disc_params}, feats(x_t, real_labels)), -1)
    r1 = jnp.mean(losses.r1_penalty(logit_fn, real_t))
    loss += 0.5 * config.loss.r1_gamma * r1
    metrics["disc/r1"] = r1
  metrics["disc/loss"] = loss
  return loss, metrics


def critic_step(st, teacher_vars, batch, *, models, optimizers, config, sharding=None):
  """One fake-score update and one discriminator update; returns (state, metrics)."""
  lc, bsz = config.loss, config.batch_size
  rng = jax.random.fold_in(jax.random.fold_in(st.rng, st.step), CRITIC)
  k_x, k_f, k_s, k_r, k_g = jax.random.split(rng, 5)
  x, fake_labels = generator_samples(models, st.gen, k_x, bsz, lc.sigma_init, sharding)
  x = jax.lax.stop_gradient(x)

  f_loss, f_grads = jax.value_and_grad(fake_score_loss)(st.fake, models, x, fake_labels, k_f, lc)
  f_updates, fake_opt = optimizers.fake.update(f_grads, st.fake_opt, st.fake)

  real, real_labels = batch["images"], _labels_or_none(batch["labels"])
  sigma = _karras_sigma(k_s, bsz, lc)
  real_t = real + _bcast(sigma, real) * jax.random.normal(k_r, real.shape)
  fake_t = x + _bcast(sigma, x) * jax.random.normal(k_g, x.shape)
  (_, metrics), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
      st.disc, models, teacher_vars, st.fake, real_t, fake_t, sigma, real_labels,
      fake_labels, config)
  d_updates, disc_opt = optimizers.disc.update(d_grads, st.disc_opt, st.disc)

  metrics.update({"fake/loss": f_loss, "fake/grad_norm": optax.tree.norm(f_grads),
                  "disc/grad_norm": optax.tree.norm(d_grads),
                  "lr/fake": state_lib.learning_rate(fake_opt),
                  "lr/disc": state_lib.learning_rate(disc_opt)})
  new = st.replace(step=st.step + 1,
                   fake=optax.apply_updates(st.fake, f_updates), fake_opt=fake_opt,
                   disc=optax.apply_updates(st.disc, d_updates), disc_opt=disc_opt)
  return new, metrics
