r"""Stable Diffusion teacher sampling (SD 1.x and SDXL): DDIM or Euler in sigma space, sharded.

  pipe = sd.load_pipeline(DIR)
  images, prompt_index = sampling.sample(pipe, ["a photo of a cat"], steps=50, cfg=7.5)

The command line is `python -m fdistill_jax.tools.sample_t2i` (fdistill_jax/tools/sample_t2i.py).

Both samplers integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
with Euler steps on the guided denoiser D = D_u + w (D_c - D_u)
(`fdistill_jax.pipelines.denoisers`); in sigma space a deterministic DDIM step (eta = 0)
is exactly such an Euler step, so they differ only in their noise levels:

* `ddim`: sigma at diffusers' DDIMScheduler timesteps ('leading' spacing,
  `steps_offset` from the scheduler config: 981, 961, ..., 1 for 50 steps),
  ending at sigma = 0 when `set_alpha_to_one`, else at sigma_min (SD 1.5).
  The result equals diffusers' DDIM pipeline latents.
* `euler`: Karras et al. (2022, Eq. 5) levels from sigma_max to sigma_min
  (rho = 7), then 0 (k-diffusion's `sample_euler` with `get_sigmas_karras`).

Start and end are on the DDPM scale, as diffusers': the latent noise
z ~ N(0, I) is x = z sqrt(1 + sigma_0^2) in sigma space, and the returned
latents are x / sqrt(1 + sigma_N^2) (x itself when sigma_N = 0).

Randomness: sample i (global index; prompt i // num_per_prompt) draws its noise
from fold_in(fold_in(PRNGKey(seed), i), 0), as `fdistill_jax.pipelines.sampling` does, so
an image depends on (seed, i) only, not on the batch size or device count.
Batches are sharded over all devices with a Mesh and jax.jit.

`guided_batch_fn` is the one teacher-sampling loop: `sample` runs it on a
pipeline, `fdistill_jax.problems.t2i.run_sampling` on a training run's teacher
and conditioning. Prompts are tokenised on the host and encoded inside the jitted batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.data import pixels
from fdistill_jax.pipelines import edm_sampler
from fdistill_jax.pipelines import sampling as sampling_lib
from fdistill_jax.pipelines import denoisers as denoiser_lib
from fdistill_jax.pipelines import sd

SAMPLERS = ("ddim", "euler")


def ddim_timesteps(num_train_timesteps: int, steps: int, steps_offset: int = 1) -> np.ndarray:
  """diffusers DDIMScheduler.set_timesteps, 'leading' spacing: descending int timesteps."""
  if not 1 <= steps <= num_train_timesteps:
    raise ValueError(f"steps={steps}; DDIM needs 1 <= steps <= {num_train_timesteps}.")
  ratio = num_train_timesteps // steps
  return (np.arange(steps) * ratio)[::-1].astype(np.int64) + steps_offset


def sampler_sigmas(schedule: denoiser_lib.DiscreteSchedule, sampler: str, steps: int) -> np.ndarray:
  """The steps + 1 noise levels of `sampler` (module docstring), float64, descending."""
  if sampler == "ddim":
    t = ddim_timesteps(len(schedule.sigmas), steps, schedule.steps_offset)
    last = 0.0 if schedule.set_alpha_to_one else schedule.sigma_min
    return np.concatenate([schedule.sigmas[t], [last]])
  if sampler == "euler":
    return edm_sampler.edm_sigma_steps(steps, schedule.sigma_min, schedule.sigma_max, rho=7.0)
  raise ValueError(f"sampler={sampler!r}; expected one of {SAMPLERS}.")


def euler_sample(denoise, noise, sigmas, cond):
  """Euler steps of the PF-ODE over `sigmas` from DDPM-scale `noise`; returns DDPM-scale latents."""
  s = jnp.asarray(sigmas, jnp.float32)
  b = noise.shape[0]

  def step(i, x):
    d = (x - denoise(x, jnp.full((b,), s[i]), cond)) / s[i]
    return x + (s[i + 1] - s[i]) * d

  x = jnp.asarray(noise, jnp.float32) * jnp.sqrt(1.0 + s[0] ** 2)
  x = jax.lax.fori_loop(0, len(sigmas) - 1, step, x)
  return x / jnp.sqrt(1.0 + s[-1] ** 2)


def latent_shape(pipe, height: int, width: int) -> tuple:
  f = sd.vae_factor(pipe.vae)
  if height % f or width % f:
    raise ValueError(f"height={height}, width={width}: both must be multiples of the VAE's "
                     f"downsampling factor {f} (e.g. 512).")
  return (height // f, width // f, pipe.vae.latent_channels)


def guided_batch_fn(teacher, encode, sigmas, cfg, shape, num_per_prompt, decode=True):
  """The one teacher-sampling batch function, for `sample_all` / `BatchSampler`.

  fn(variables, key, indices) -> (images in [-1, 1] or latents, prompt index), with
  variables {'teacher': the `LatentDenoiser`'s params, 'tokens': {'tokens'[, 'tokens_2']}
  of the prompts}; image i shows prompt i // num_per_prompt.

  Args:
    teacher: the `fdistill_jax.pipelines.sd.LatentDenoiser` (U-Net, text towers, VAE).
    encode: `encode(teacher_vars, tokens) -> (cond, uncond)`, traceable: the batch's
      conditioning and CFG's unconditional input for one sample.
    sigmas: the sampler's noise levels (`sampler_sigmas`).
    cfg: guidance weight w (1: none).
    shape: latent shape (h, w, C).
    num_per_prompt: images per prompt.
    decode: decode the latents with the VAE.
  """
  def fn(v, key, indices):
    tv = {"params": v["teacher"]}
    prompt = indices // num_per_prompt
    tokens = jax.tree.map(lambda t: jnp.take(t, prompt, axis=0, mode="clip"), v["tokens"])
    cond, uncond = encode(tv, tokens)
    denoise = lambda x, sigma, c: teacher.apply(tv, x, sigma, c)
    guided = denoiser_lib.cfg_denoiser(denoise, uncond, cfg)
    noise = sampling_lib.sample_noise(key, indices, shape)
    latents = euler_sample(guided, noise, sigmas, cond)
    return (teacher.apply(tv, latents, method="decode") if decode else latents), prompt
  return fn


def pipeline_encoder(pipe, height: int, width: int):
  """`encode` of `guided_batch_fn` for a pipeline: its prompt encoding, SDXL's time_ids for
  height x width, and its unconditional input (`LatentDenoiser.unconditional`)."""
  module = pipe.module
  empty = [jnp.asarray(t) for t in pipe.token_batch([""]).values()]
  ids = jnp.asarray(sd.time_ids(1, height, width)) if pipe.is_sdxl else None

  def encode(tv, tokens):
    cond = module.apply(tv, *tokens.values(), method="encode_text")
    uncond = module.apply(tv, *empty, method="unconditional")
    if ids is not None:
      n = tokens["tokens"].shape[0]
      cond = {**cond, "time_ids": jnp.broadcast_to(ids, (n, 6))}
      uncond = {**uncond, "time_ids": ids}
    return cond, uncond
  return encode


def sample(pipe, prompts, *, num_per_prompt=1, steps=50, cfg=7.5, sampler="ddim", seed=0,
           height=512, width=512, batch=8, devices=None, decode=True, timestep="interpolate"):
  """Teacher samples of an SD 1.x or SDXL pipeline for `prompts` (module docstring).

  Returns:
    (x, prompt_index): uint8 images [N, H, W, 3] (decode=True) or float32
    latents [N, h, w, C] (U-Net scale), and int32 [N], N = len(prompts) * num_per_prompt.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts or num_per_prompt < 1:
    raise ValueError("need at least one prompt and num_per_prompt >= 1.")
  variables = {"teacher": pipe.params["params"], "tokens": pipe.token_batch(prompts)}
  sigmas = sampler_sigmas(pipe.schedule, sampler, steps)
  teacher = pipe.module.clone(timestep=timestep)
  fn = guided_batch_fn(teacher, pipeline_encoder(pipe, height, width), sigmas, cfg,
                       latent_shape(pipe, height, width), num_per_prompt, decode)
  return sampling_lib.sample_all(fn, variables, len(prompts) * num_per_prompt, seed=seed,
                                 batch=batch, devices=devices,
                                 postprocess=pixels.to_uint8 if decode else None,
                                 what="text-to-image samples")
