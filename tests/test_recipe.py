"""The training recipe against the authors' choices (paper App. B / Table 5, NVIDIA
FastGen, DMD2): learning-rate schedules by iteration, per-iteration EMA, the fake
score's noise levels, student dropout, the discriminator (noise, head, features),
the running per-bin mean in the state, and a batch-sharded step (XLA cost analysis).

Networks are the 2x32 toy MLPs of `test_train.small_toy` unless a test needs an
image network; compilation dominates.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import cifar10, imagenet64, tiny
from fdistill_jax import losses
from fdistill_jax import plugins
from fdistill_jax.models import heads as heads_lib
from fdistill_jax.problems.image import teachers as image_teachers
from fdistill_jax.train import loop as train
from fdistill_jax.train import models as models_lib
from fdistill_jax.train import noise
from fdistill_jax.train import state as state_lib
from fdistill_jax.train import steps
from tests.helpers import saved_state, small_toy

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


def trainer_for(config, devices=None):
  config = ml_collections.FrozenConfigDict(config)
  return train.Trainer(config, None, devices=devices or jax.devices()[:1], registry=REGISTRY)


def batch_at(trainer, step):
  c = trainer.config
  return trainer.to_global(trainer.source.batch(step, global_batch_size=c.batch_size))


# ----------------------------------------------------------------------------
# 1. Learning-rate schedules count iterations.


def test_imagenet64_generator_lr_drops_at_iteration_200k():
  """Paper App. B: 2e-6 for 200k iterations, then 5e-7. The generator updates every
  5th iteration, so a schedule on its update count would still give 2e-6 here."""
  c = small_toy("js")
  c.optim = imagenet64.get_config("js").optim
  t = trainer_for(c)
  assert float(t.optimizers.gen_lr(200_001)) == pytest.approx(5e-7)
  for step, want in [(199_999, 2e-6), (200_001, 5e-7)]:
    st = t.state.replace(step=jnp.int32(step))
    new, metrics = t.gen_step(st, t.teacher_vars, None)
    assert float(metrics["lr/gen"]) == pytest.approx(want, rel=1e-6), step
    assert float(new.gen_opt[1].hyperparams["learning_rate"]) == pytest.approx(want, rel=1e-6)
    _, metrics = t.critic_step(new, t.teacher_vars, batch_at(t, step))
    assert float(metrics["lr/fake"]) == pytest.approx(want, rel=1e-6)
    assert float(metrics["lr/disc"]) == pytest.approx(want, rel=1e-6)
    t._init_state(t.initial_params)          # the steps donate their input state


def test_gradient_clipping_applies_to_the_generator_only_by_default():
  """FastGen clips the generator's gradient norm at 10 and leaves the fake score and
  the heads alone; `optim.clip_critic` clips all three (DMD2). Two AdamW updates,
  the first with a gradient of norm 1e3, against optax's own transformations."""
  import optax  # pylint: disable=g-import-not-at-top
  optim = small_toy("js").optim
  params = {"w": jnp.zeros((4,))}
  grads = [{"w": jnp.array([600.0, -800.0, 0.0, 0.0])}, {"w": jnp.array([1.0, 2.0, -3.0, 0.5])}]
  def run(tx):
    state, out = tx.init(params), params
    for g in grads:
      upd, state = tx.update(g, state, out)
      out = optax.apply_updates(out, upd)
    return np.asarray(out["w"])
  adamw = optax.adamw(optim.gen_lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  clipped = run(optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw))
  plain = run(adamw)
  assert np.max(np.abs(clipped - plain) / np.abs(plain)) > 1e-2   # float32 agreement: 1e-5
  opts = state_lib.make_optimizers(optim)
  np.testing.assert_allclose(run(opts.gen), clipped, rtol=1e-5)
  np.testing.assert_allclose(run(opts.fake), plain, rtol=1e-5)
  np.testing.assert_allclose(run(opts.disc), plain, rtol=1e-5)
  optim.clip_critic = True
  np.testing.assert_allclose(run(state_lib.make_optimizers(optim).fake), clipped, rtol=1e-5)


# ----------------------------------------------------------------------------
# 2. EMA per iteration.


def test_ema_after_n_iterations_equals_the_closed_form():
  """After N iterations, ema = d^N theta_0 + sum_i (1 - d) d^(N-1-i) theta(i), with
  theta(i) the generator during iteration i (updated every 3rd iteration here).
  float32 accumulation: 1e-5 relative."""
  c = small_toy("js", fake_score_update_freq=3, total_steps=7, ema_decays=(0.9, 0.5))
  t = trainer_for(c)
  theta0 = jax.device_get(t.state.gen)
  during = []
  for step in range(c.total_steps):
    batch = batch_at(t, step)
    if step % c.fake_score_update_freq == 0:
      t.state, _ = t.gen_step(t.state, t.teacher_vars, batch)
    during.append(jax.device_get(t.state.gen))
    t.state, _ = t.critic_step(t.state, t.teacher_vars, batch)
  n = c.total_steps
  for k, d in enumerate(c.ema_decays):
    want = jax.tree.map(lambda p0, *ps: d**n * p0 + sum(
        (1 - d) * d**(n - 1 - i) * p for i, p in enumerate(ps)), theta0, *during)
    for a, b in zip(jax.tree.leaves(jax.device_get(t.state.ema[k])), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_paper_configs_keep_fastgens_three_emas_and_sample_the_first():
  for get in (cifar10.get_config, imagenet64.get_config):
    assert tuple(get("js").ema_decays) == (0.9999, 0.99995, 0.9996)


# ----------------------------------------------------------------------------
# 3. The fake score learns at the generator loss's noise levels.


def _fake_score_sigmas(monkeypatch, config, n=4096):
  """The sigmas `steps.fake_score_loss` really passes to the EDM loss (eager call)."""
  seen = []
  real_loss = losses.fake_score_loss
  def spy(denoised, target, sigma, *a, **k):
    seen.append(np.asarray(sigma))
    return real_loss(denoised, target, sigma, *a, **k)
  monkeypatch.setattr(steps.losses, "fake_score_loss", spy)
  models = models_lib.Models(teacher=None, student=_Identity(), heads=None, feature_keys=(),
                             sample_shape=(2,), num_classes=0)
  steps.fake_score_loss({}, models, jnp.zeros((n, 2)), None, jax.random.PRNGKey(0), config)
  return seen[0]


class _Identity:
  def apply(self, variables, x, sigma, labels, **kwargs):
    del variables, sigma, labels, kwargs
    return x


def test_fake_score_trains_on_the_karras_levels_of_the_generator_loss(monkeypatch):
  """Default: the same index-uniform Karras levels as the generator loss (DMD2 /
  FastGen): every sigma is a schedule level in [min_index, max_index], and the mass
  above sigma = 10 equals the generator's (about 0.3; 4096 draws, +-0.03). The
  log-normal option puts under 1% there."""
  c = small_toy("js")
  lc = c.loss
  sigma = _fake_score_sigmas(monkeypatch, c)
  grid = np.asarray(losses.karras_sigmas(lc.num_sigmas, lc.sigma_min, lc.sigma_max))
  allowed = grid[lc.min_index:lc.max_index + 1]
  assert np.all(np.min(np.abs(sigma[:, None] - allowed[None]), axis=1) <= 1e-6 * allowed.max())
  gen = np.asarray(noise.noise_levels(c, "fdistill", jax.random.PRNGKey(1), 4096))
  assert abs(np.mean(sigma > 10) - np.mean(gen > 10)) < 0.03
  assert np.mean(sigma > 10) > 0.25
  lognormal = ml_collections.ConfigDict(c.to_dict())
  lognormal.loss.fake_sigma = "lognormal"
  assert np.mean(_fake_score_sigmas(monkeypatch, lognormal) > 10) < 0.01


# ----------------------------------------------------------------------------
# 6. No dropout in the student copies.


def test_student_copies_have_no_dropout_by_default():
  c = tiny.get_config("js")
  c.teacher.arch.dropout = 0.13
  teacher = image_teachers.random_teacher(ml_collections.FrozenConfigDict(c))
  models = models_lib.from_teacher(teacher, c.disc, c.student_dropout)
  assert teacher.module.model.dropout == 0.13 and models.teacher.model.dropout == 0.13
  assert models.student.model.dropout == 0.0
  x = jnp.ones((2, 8, 8, 3)) * 0.3
  sigma, labels = jnp.full((2,), 0.5), jax.nn.one_hot(jnp.arange(2), 4)
  def fake(student, key):
    return student.apply(teacher.variables, x, sigma, labels, train=True, rngs={"dropout": key})
  np.testing.assert_array_equal(fake(models.student, jax.random.PRNGKey(0)),
                                fake(models.student, jax.random.PRNGKey(1)))
  dropped = models_lib.from_teacher(teacher, c.disc, 0.13).student
  assert dropped.model.dropout == 0.13
  assert not np.allclose(fake(dropped, jax.random.PRNGKey(0)), fake(dropped, jax.random.PRNGKey(1)))


# ----------------------------------------------------------------------------
# 7. Discriminator: independent noise, DMD2's head, DMD2's fake-score features.


def test_a_feature_resolution_the_teacher_lacks_names_the_fields_to_change():
  """disc.resolutions=(3,) on the 8x8 tiny teacher (encoder at 8, 4, ...): the error lists
  what exists and says to change disc.resolutions or data.resolution (issue 23, item 7)."""
  c = tiny.get_config("js")
  c.disc.resolutions = (3,)
  teacher = image_teachers.random_teacher(ml_collections.FrozenConfigDict(c))
  models = models_lib.from_teacher(teacher, c.disc)
  with pytest.raises(ValueError) as e:
    models_lib.init_heads(models, teacher.variables, jax.random.PRNGKey(0))
  message = str(e.value)
  assert "--config.disc.resolutions" in message and "--config.data.resolution" in message
  assert "[8, 4" in message and len(message.splitlines()) == 1, message



def test_real_and_generated_batches_get_independent_noise_levels(monkeypatch):
  """The heads see real data at its own sigma and noise (DMD2, FastGen)."""
  c = ml_collections.FrozenConfigDict(small_toy("js", batch_size=64))
  t = trainer_for(c)
  seen = []
  real_features = steps.features
  def spy(models, teacher_vars, fake_params, x_t, sigma, labels, features_from):
    seen.append(np.asarray(sigma))
    return real_features(models, teacher_vars, fake_params, x_t, sigma, labels, features_from)
  monkeypatch.setattr(steps, "features", spy)
  real = jnp.zeros((64, 2))
  steps.disc_loss(t.state.disc, t.state.fake, t.models, t.teacher_vars, real, None, real, None,
                  jax.random.PRNGKey(0), c)
  real_sigma, fake_sigma = seen
  assert np.mean(real_sigma == fake_sigma) < 0.1
  grid = np.asarray(losses.karras_sigmas())
  assert np.isin(real_sigma, grid).all() and np.isin(fake_sigma, grid).all()


def _torch_dmd2_head(channels, res):
  """FastGen's Discriminator_EDM head for one resolution, written in torch."""
  groups = heads_lib.fastgen_groups(channels)
  layers = []
  while res > 8:
    layers += [torch.nn.Conv2d(channels, channels, 4, 2, 1), torch.nn.GroupNorm(groups, channels),
               torch.nn.SiLU()]
    res //= 2
  layers += [torch.nn.Conv2d(channels, channels, 4, 2, 1), torch.nn.GroupNorm(groups, channels),
             torch.nn.SiLU(), torch.nn.Conv2d(channels, channels, 4, 4, 0),
             torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
             torch.nn.Conv2d(channels, 1, 1, 1, 0)]
  return torch.nn.Sequential(*layers)


def _to_flax(seq):
  """torch Sequential -> params of DMD2Head (conv{i}/norm{i}, then out)."""
  convs = [m for m in seq if isinstance(m, torch.nn.Conv2d)]
  norms = [m for m in seq if isinstance(m, torch.nn.GroupNorm)]
  conv = lambda m: {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0),
                    "bias": m.bias.detach().numpy()}
  params = {f"conv{i}": conv(m) for i, m in enumerate(convs[:-1])}
  params.update({f"norm{i}": {"scale": m.weight.detach().numpy(), "bias": m.bias.detach().numpy()}
                 for i, m in enumerate(norms)})
  params["out"] = conv(convs[-1])
  return params


@pytest.mark.parametrize("res, channels", [(8, 64), (16, 48), (32, 8)])
def test_dmd2_head_equals_fastgens_torch_head(res, channels):
  """Same parameters, same logits (float32, 1e-4 relative) as FastGen's head layout,
  and the parameter count of the closed form in the DMD2Head docstring."""
  torch.manual_seed(0)
  seq = _torch_dmd2_head(channels, res)
  for m in seq:
    if isinstance(m, torch.nn.GroupNorm):   # non-trivial affine parameters
      torch.nn.init.normal_(m.weight, 1.0, 0.1)
      torch.nn.init.normal_(m.bias, 0.0, 0.1)
  x = torch.randn(3, channels, res, res)
  want = seq(x).detach().numpy().reshape(3)
  params = _to_flax(seq)
  got = heads_lib.DMD2Head().apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  n_down = int(np.log2(res // 4))
  count = sum(p.numel() for p in seq.parameters())
  assert count == (n_down + 1) * (16 * channels**2 + 3 * channels) + channels + 1
  assert count == sum(np.size(v) for v in jax.tree.leaves(params))


def head_parameter_count(keys, shapes, head="dmd2", channels=256):
  heads = heads_lib.DiscriminatorHeads(keys=keys, head=head, channels=channels)
  feats = {k: jnp.zeros((1,) + s) for k, s in zip(keys, shapes)}
  params = jax.eval_shape(lambda: heads.init(jax.random.PRNGKey(0), feats))["params"]
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))


def test_paper_head_parameter_counts():
  """The counts quoted in docs/image_runs.md: CIFAR-10's three heads on DDPM++'s 256-channel
  maps at 32, 16, 8; ImageNet-64's one head on ADM's 768-channel 8x8 map."""
  c10 = ((32, 32, 256), (16, 16, 256), (8, 8, 256))
  assert head_parameter_count((32, 16, 8), c10) == 9_444_867
  assert head_parameter_count((8,), ((8, 8, 768),)) == 18_879_745
  light = lambda c_in: 2 * c_in + 9 * c_in * 256 + 256 + 16 * 256 * 256 + 256 + 257
  assert head_parameter_count((32, 16, 8), c10, head="light") == 3 * light(256) == 4_919_043
  assert head_parameter_count((8,), ((8, 8, 768),), head="light") == light(768) == 2_820_353
  for get in (cifar10.get_config, imagenet64.get_config):
    assert get("js").disc.head == "dmd2"


def test_fake_score_features_train_the_fake_score_encoder():
  """disc.features_from='fake_score' is DMD2's setup: the critic's fake-score gradient
  is that of its denoising loss plus fake_score_gan_weight x that of the GAN loss
  through the features (computed here on their own); with teacher features the GAN
  loss adds nothing."""
  c = ml_collections.FrozenConfigDict(small_toy(
      "js", **{"disc.features_from": "fake_score", "disc.fake_score_gan_weight": 0.5,
               "batch_size": 32}))
  t = trainer_for(c)
  st, batch = t.state, batch_at(t, 0)
  rng = jax.random.PRNGKey(4)
  x, labels = steps.generator_samples(t.models, st.gen, rng, c.batch_size, c.loss.sigma_init)
  _, f_grads, _, _ = steps._critic_grads(st, t.models, t.teacher_vars, x, labels, batch, rng, c)
  k_f, k_d = jax.random.split(rng)
  denoise = jax.grad(steps.fake_score_loss)(st.fake, t.models, x, labels, k_f, c)
  gan = jax.grad(lambda f: steps.disc_loss(st.disc, f, t.models, t.teacher_vars, batch["images"],
                                           None, x, labels, k_d, c)[0])(st.fake)
  want = jax.tree.map(lambda a, b: a + 0.5 * b, denoise, gan)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gan)) > 0
  for a, b in zip(jax.tree.leaves(f_grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  teacher_c = ml_collections.FrozenConfigDict({**c.to_dict(), "disc": {
      **c.disc.to_dict(), "features_from": "teacher"}})
  _, f_teacher, _, _ = steps._critic_grads(st, t.models, t.teacher_vars, x, labels, batch, rng,
                                           teacher_c)
  for a, b in zip(jax.tree.leaves(f_teacher), jax.tree.leaves(denoise)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# 5. The running per-bin mean is training state.


@pytest.mark.slow      # a run and its resume
def test_running_bin_mean_lives_in_the_checkpoint(tmp_path):
  c = small_toy("fkl", **{"loss.ratio_ema_rate": 0.5, "total_steps": 4, "checkpoint_every": 2})
  st = jax.device_get(train.train_and_evaluate(c, str(tmp_path), registry=REGISTRY))
  assert st.log_ratio_ema.shape == (c.loss.num_bins,) and np.any(st.log_ratio_ema != 0)
  np.testing.assert_array_equal(saved_state(str(tmp_path), 4)["log_ratio_ema"],
                                st.log_ratio_ema)


# ----------------------------------------------------------------------------
# 8. The steps are sharded over the batch.


def step_flops(config, devices):
  t = trainer_for(config, devices)
  batch = batch_at(t, 0)
  gen = t.gen_step.lower(t.state, t.teacher_vars, batch).compile().cost_analysis()["flops"]
  critic = t.critic_step.lower(t.state, t.teacher_vars, batch).compile().cost_analysis()["flops"]
  return np.array([gen, critic])


def test_per_device_flops_fall_with_the_device_count():
  """XLA cost analysis (compiled, not run): with 8 simulated devices each device does
  at most 1.1/8 of the 1-device work in both steps, at 128 examples per device. What
  stays replicated is parameter-sized (optimiser, EMA, norms: measured ~0.2 MFLOP
  here, 1% of the 8-device figure); 1 and 8 devices agree on the results
  (test_train.test_one_device_and_eight_devices_agree)."""
  c = small_toy("fkl", **{"batch_size": 1024, "loss.r1_gamma": 1.0})
  one, eight = step_flops(c, jax.devices()[:1]), step_flops(c, jax.devices())
  assert np.all(eight <= one / 8 * 1.1), (eight, one, eight / one)
