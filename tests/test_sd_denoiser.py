"""The sigma-space denoiser and samplers against diffusers' DDIMScheduler arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.pipelines import denoisers as denoiser
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.pipelines import sd_sampling as sampling
from sd_helpers import FIXTURES, require_fixtures

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def scheduler_config():
  require_fixtures()
  return pipeline.read_json(FIXTURES / "scheduler" / "scheduler_config.json")


@pytest.fixture(scope="module")
def schedule(scheduler_config):
  return denoiser.DiscreteSchedule.from_config(scheduler_config)


def _scheduler(config, steps):
  s = diffusers.DDIMScheduler.from_config(config)
  s.set_timesteps(steps)
  return s


def _fake_eps(z, t, cond):
  """A smooth stand-in for the U-Net: depends on the input, the timestep and the conditioning."""
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (z.ndim - 1))
  return jnp.tanh(z) * (0.5 + t / 2000.0) + 0.1 * cond


def _fake_eps_torch(z, t, cond):
  return torch.tanh(z) * (0.5 + float(t) / 2000.0) + 0.1 * cond


def test_schedule_matches_diffusers(schedule, scheduler_config):
  ref = _scheduler(scheduler_config, 50).alphas_cumprod.numpy()
  np.testing.assert_allclose(schedule.alphas_cumprod, ref, rtol=2e-6)
  np.testing.assert_allclose([schedule.sigma_min, schedule.sigma_max], [0.0291672, 14.614641],
                             rtol=1e-5)


def test_sigma_to_t(schedule):
  t = np.array([0, 1, 500, 981, 999])
  np.testing.assert_allclose(schedule.sigma_to_t(schedule.sigmas[t]), t, atol=2e-3)
  np.testing.assert_array_equal(schedule.sigma_to_t(schedule.sigmas[t], "nearest"), t)
  # Halfway in log sigma between t = 10 and 11 is t = 10.5; nearest picks one of them.
  mid = np.sqrt(schedule.sigmas[10] * schedule.sigmas[11])
  np.testing.assert_allclose(schedule.sigma_to_t(mid), 10.5, atol=2e-3)
  assert float(schedule.sigma_to_t(mid, "nearest")) in (10.0, 11.0)
  # Out of range clamps; t_to_sigma inverts sigma_to_t.
  np.testing.assert_allclose(schedule.sigma_to_t(np.array([1e-3, 100.0])), [0, 999])
  np.testing.assert_allclose(schedule.t_to_sigma(schedule.sigma_to_t(2.5)), 2.5, rtol=1e-5)


def test_denoiser_is_one_ddim_step(schedule, scheduler_config):
  """D and one Euler step in sigma space equal DDIMScheduler.step (eta = 0) from the same eps."""
  sched = _scheduler(scheduler_config, 50)
  rng = np.random.default_rng(0)
  cond = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  seen = {}

  def eps_fn(z, t, c):
    seen["z"], seen["t"] = z, t
    return _fake_eps(z, t, c)

  denoise = denoiser.eps_denoiser(eps_fn, schedule)
  for i in (0, 17, 49):
    t = int(sched.timesteps[i])
    z = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)   # DDPM-scale sample
    eps = _fake_eps_torch(torch.from_numpy(z), t, torch.from_numpy(cond))
    out = sched.step(eps, t, torch.from_numpy(z), eta=0.0)
    ab, ab_prev = sched.alphas_cumprod[t].item(), (
        sched.alphas_cumprod[t - 20].item() if t >= 20 else sched.final_alpha_cumprod.item())
    sigma, sigma_prev = np.sqrt((1 - ab) / ab), np.sqrt((1 - ab_prev) / ab_prev)
    x = z / np.sqrt(ab)                                          # the same point in sigma space
    d = denoise(x, sigma, cond)
    np.testing.assert_allclose(seen["z"], z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"], t, atol=2e-3)
    np.testing.assert_allclose(d, out.pred_original_sample.numpy(), rtol=1e-4, atol=1e-5)
    x_prev = x + (sigma_prev - sigma) * (x - d) / sigma
    np.testing.assert_allclose(x_prev * np.sqrt(ab_prev), out.prev_sample.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_ddim_sampler_equals_diffusers_loop(schedule, scheduler_config):
  """sampling.euler_sample on the 'ddim' sigmas reproduces a 10-step diffusers DDIM loop."""
  steps = 10
  sched = _scheduler(scheduler_config, steps)
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, steps, 1), sched.timesteps.numpy())
  rng = np.random.default_rng(1)
  noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  cond = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  z = torch.from_numpy(noise)
  for t in sched.timesteps:
    z = sched.step(_fake_eps_torch(z, int(t), torch.from_numpy(cond)), t, z, eta=0.0).prev_sample
  denoise = denoiser.eps_denoiser(_fake_eps, schedule, timestep="nearest")
  sigmas = sampling.sampler_sigmas(schedule, "ddim", steps)
  ours = jax.jit(lambda n, c: sampling.euler_sample(denoise, n, sigmas, c))(noise, cond)
  np.testing.assert_allclose(ours, z.numpy(), rtol=1e-4, atol=1e-4)


def test_euler_sigmas_are_karras(schedule):
  s = sampling.sampler_sigmas(schedule, "euler", 5)
  assert len(s) == 6 and s[-1] == 0
  np.testing.assert_allclose([s[0], s[-2]], [schedule.sigma_max, schedule.sigma_min], rtol=1e-6)
  ramp = s[:-1] ** (1 / 7)
  np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], rtol=1e-6)


def test_cfg_denoiser_formula():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.float32)
  cond = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  uncond = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  sigma = jnp.array([0.5, 1.0, 7.0])
  base = lambda x, s, c: x * jnp.mean(c, axis=(1, 2))[:, None, None, None] / (1 + s[:, None, None, None])
  d_c = base(x, sigma, cond)
  d_u = base(x, sigma, jnp.broadcast_to(uncond, cond.shape))
  guided = denoiser.cfg_denoiser(base, uncond, 7.5)(x, sigma, cond)
  np.testing.assert_allclose(guided, d_u + 7.5 * (d_c - d_u), rtol=1e-5, atol=1e-6)
  assert denoiser.cfg_denoiser(base, uncond, 1.0) is base
