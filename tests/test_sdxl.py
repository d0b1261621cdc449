"""SDXL in Flax against diffusers 0.42 / transformers 5 on a tiny random SDXL folder.

The folder is diffusers' own `StableDiffusionXLPipeline(...).save_pretrained`
of tiny random components shaped like SDXL's (modelled on diffusers' SDXL
pipeline tests): a U-Net whose first block has no attention, per-block heads
and transformer depths, linear projections and the "text_time" added
embedding; a CLIP-L-like first text encoder (quick_gelu) and a bigG-like
second one with projection (gelu, the legacy eos_token_id=2 pooling rule,
tokenizer_2 padding with "!"); a VAE with SDXL's scaling factor 0.13025.
float32 outputs must agree to TOL = 1e-5 relative (max abs error / max abs value).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.pipelines import denoisers as denoiser
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.loaders.errors import ConversionError
from sd_helpers import FIXTURES, TINY_TEXT, TINY_VAE, TOL, nchw_to_nhwc, perturbed, read_config, rel_err, require_fixtures

torch = pytest.importorskip("torch")

TEXT_2_HIDDEN, PROJECTION, TIME_DIM = 48, 40, 8
TINY_SDXL_UNET = dict(
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM,
    cross_attention_dim=TINY_TEXT["hidden_size"] + TEXT_2_HIDDEN, in_channels=4, out_channels=4,
    sample_size=8)
# SDXL's text_encoder_2 config keeps the legacy ids (bos 0, pad 1, eos 2): pooling at the largest id.
TINY_TEXT_2 = dict(vocab_size=49408, hidden_size=TEXT_2_HIDDEN, intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                   hidden_act="gelu", projection_dim=PROJECTION, bos_token_id=0, eos_token_id=2,
                   pad_token_id=1)
PROMPTS = ["a photo of a cat", "", "a red fox in the snow, " * 20]  # the last one is truncated


def _reference_pipeline():
  from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,  # pylint: disable=g-import-not-at-top
                         UNet2DConditionModel)
  from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # pylint: disable=g-import-not-at-top
                            CLIPTokenizer)
  torch.manual_seed(0)
  tok = str(FIXTURES / "tokenizer")
  return StableDiffusionXLPipeline(
      vae=perturbed(AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True), 1),
      text_encoder=perturbed(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 2),
      text_encoder_2=perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_2)), 3),
      tokenizer=CLIPTokenizer.from_pretrained(tok, model_max_length=77),
      tokenizer_2=CLIPTokenizer.from_pretrained(tok, model_max_length=77, pad_token="!"),
      unet=perturbed(UNet2DConditionModel(**TINY_SDXL_UNET), 4),
      scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1),
      force_zeros_for_empty_prompt=True, add_watermarker=False)


@pytest.fixture(scope="module")
def reference():
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")
  require_fixtures()
  return _reference_pipeline()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, reference):
  path = tmp_path_factory.mktemp("sdxl_tiny")
  reference.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def pipe(folder):
  return pipeline.load_pipeline(folder)


def _unet_reference(reference, x, t, cond):
  with torch.no_grad():
    out = reference.unet(torch.from_numpy(x), torch.from_numpy(t),
                         torch.from_numpy(np.asarray(cond["context"])),
                         added_cond_kwargs={"text_embeds": torch.from_numpy(np.asarray(cond["pooled"])),
                                            "time_ids": torch.from_numpy(np.asarray(cond["time_ids"]))})
  return nchw_to_nhwc(out.sample.numpy())


def _random_cond(rng, b, length=7):
  return {"context": rng.standard_normal((b, length, TINY_SDXL_UNET["cross_attention_dim"])).astype(np.float32),
          "pooled": rng.standard_normal((b, PROJECTION)).astype(np.float32),
          "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 32, 16, 1024, 896]][:b],
                               np.float32)}


def test_unet_matches_diffusers(pipe, reference):
  """Non-square 16x12 latents, two timesteps (one fractional), distinct pooled text and size/crop
  ids per example; the added embedding changes the output; missing SDXL inputs are refused."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 12)).astype(np.float32)
  t = np.array([3.0, 641.5], np.float32)
  cond = _random_cond(rng, 2)
  fn = jax.jit(lambda v, x, t, c: pipe.unet.apply(v, x, t, c["context"], text_embeds=c["pooled"],
                                                  time_ids=c["time_ids"]))
  ours = fn(pipe.variables["unet"], nchw_to_nhwc(x), t, cond)
  assert rel_err(ours, _unet_reference(reference, x, t, cond)) < TOL
  other = fn(pipe.variables["unet"], nchw_to_nhwc(x), t, {**cond, "time_ids": cond["time_ids"][::-1]})
  assert rel_err(other, ours) > 1e-3
  with pytest.raises(ValueError, match="text_embeds"):
    pipe.unet.apply(pipe.variables["unet"], nchw_to_nhwc(x), t, cond["context"])
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim = 88"):
    pipe.unet.apply(pipe.variables["unet"], nchw_to_nhwc(x), t, cond["context"],
                    text_embeds=cond["pooled"][:, :-1], time_ids=cond["time_ids"])


def test_text_encoders_match_transformers(pipe, reference):
  """Every hidden state of both towers, the second tower's text_embeds (gelu, projection)."""
  ids = np.asarray(reference.tokenizer_2(PROMPTS, padding="max_length", max_length=77,
                                         truncation=True).input_ids)
  with torch.no_grad():
    ref_1 = reference.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
    ref_2 = reference.text_encoder_2(torch.from_numpy(ids), output_hidden_states=True)
  _, _, states_1 = jax.jit(pipe.text_encoder.apply, static_argnums=2)(
      pipe.variables["text_encoder"], ids, True)
  embeds, last, states_2 = jax.jit(pipe.text_encoder_2.apply, static_argnums=2)(
      pipe.variables["text_encoder_2"], ids, True)
  for ours, ref in ((states_1, ref_1.hidden_states), (states_2, ref_2.hidden_states)):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
      assert rel_err(a, b.numpy()) < TOL
  assert rel_err(last, ref_2.last_hidden_state.numpy()) < TOL
  assert rel_err(embeds, ref_2.text_embeds.numpy()) < TOL


def test_encode_prompts_matches_diffusers(pipe, reference):
  """Both tokenizers (tokenizer_2 pads with '!'), penultimate states concatenated to 80
  channels, pooled from the second tower; the CFG negative is zeros (force_zeros_for_empty_prompt)."""
  assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
  with torch.no_grad():
    context, neg, pooled, neg_pooled = reference.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True)
  ours = pipe.encode_prompts(PROMPTS)
  assert ours["context"].shape == (3, 77, TINY_SDXL_UNET["cross_attention_dim"])
  assert rel_err(ours["context"], context.numpy()) < TOL
  assert rel_err(ours["pooled"], pooled.numpy()) < TOL
  uncond = pipe.unconditional(3)
  np.testing.assert_array_equal(uncond["context"], neg.numpy())
  np.testing.assert_array_equal(uncond["pooled"], neg_pooled.numpy())


def test_cfg_denoiser_with_pytree_conditioning(pipe, reference):
  """D(x; sigma, cond) with CFG on the {'context', 'pooled', 'time_ids'} pytree equals
  x - sigma (eps_u + w (eps_c - eps_u)) of diffusers' U-Net at the discrete timestep."""
  rng = np.random.default_rng(1)
  cond = _random_cond(rng, 2, length=77)
  uncond = {**pipe.unconditional(1), "time_ids": pipe.time_ids(1, 128, 96)}
  cond["time_ids"] = pipe.time_ids(2, 128, 96)
  t = 500
  sigma = float(pipe.schedule.sigmas[t])
  x = rng.standard_normal((2, 16, 12, 4)).astype(np.float32) * sigma
  ours = jax.jit(denoiser.cfg_denoiser(pipe.denoiser(), uncond, 8.0))(x, sigma, cond)
  z = (x / np.sqrt(1 + sigma**2)).transpose(0, 3, 1, 2).astype(np.float32)
  ts = np.full((2,), t, np.float32)
  eps_c = _unet_reference(reference, z, ts, cond)
  u = {k: np.broadcast_to(np.asarray(v), (2,) + v.shape[1:]).copy() for k, v in uncond.items()}
  eps_u = _unet_reference(reference, z, ts, u)
  expected = x - sigma * (eps_u + 8.0 * (eps_c - eps_u))
  assert rel_err(ours, expected) < TOL


def test_vae_scaling_and_decode(pipe, reference):
  assert pipe.scaling_factor == 0.13025 and pipe.shift_factor == 0.0
  z = np.random.default_rng(2).standard_normal((1, 4, 6, 5)).astype(np.float32)
  with torch.no_grad():
    ref = reference.vae.decode(torch.from_numpy(z) / 0.13025).sample.numpy()
  assert rel_err(pipe.decode(nchw_to_nhwc(z)), nchw_to_nhwc(ref)) < TOL


def test_loader_refusals(folder, tmp_path):
  """One loader for both families: it reads SDXL folders as SDXL, refuses a folder without
  configs, and refuses mismatched SDXL components."""
  assert pipeline.is_sdxl_folder(folder) and not pipeline.is_sdxl_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="unet/config.json"):
    pipeline.load_pipeline(tmp_path)
  cfgs = pipeline.read_configs(folder)
  assert cfgs["model_index"]["force_zeros_for_empty_prompt"] is True
  bad = {**cfgs, "text_encoder_2": {**cfgs["text_encoder_2"], "projection_dim": 32}}
  with pytest.raises(ConversionError, match="projection_class_embeddings_input_dim is 88"):
    pipeline.build_modules(bad)
  bad = {**cfgs, "text_encoder_2": {**cfgs["text_encoder_2"], "hidden_size": 64}}
  with pytest.raises(ConversionError, match="cross_attention_dim is 80"):
    pipeline.build_modules(bad)


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text"}, r"addition_embed_type='text' is not implemented"),
    ({"addition_time_embed_dim": None}, r"needs positive integers"),
    ({"transformer_layers_per_block": [[1, 1], [2, 2], [3, 3]]}, r"\(per resnet\)"),
    ({"transformer_layers_per_block": [1, 2]}, r"has 2 entries for 3 blocks"),
])
def test_unet_config_refusals(folder, change, message):
  with pytest.raises(ConversionError, match=message):
    configs.unet_from_config({**read_config(folder, "unet"), **change})


def test_time_ids():
  np.testing.assert_array_equal(pipeline.time_ids(2, 1024, 768, crop=(8, 4), original=(512, 512)),
                                [[512, 512, 8, 4, 1024, 768]] * 2)
  assert pipeline.time_ids(1, 1024, 1024).dtype == np.float32
  assert isinstance(jnp.asarray(pipeline.time_ids(1, 64, 64)), jax.Array)


def test_engine_teacher_matches_the_pipeline(pipe, reference):
  """The engine's teacher is the pipeline's module: its encode_text equals diffusers'
  encode_prompt, and D(x; sigma, cond) on the pytree equals `unet_denoiser` (checked above
  against diffusers)."""
  teacher, tv = pipe.module, pipe.params
  assert teacher.text_encoder_2 is pipe.text_encoder_2 and teacher.force_zeros_for_empty_prompt
  ids, ids_2 = pipe.tokenize(PROMPTS[:2])
  cond = jax.jit(lambda v, a, b: teacher.apply(v, a, b, method="encode_text"))(tv, ids, ids_2)
  with torch.no_grad():
    context, _, pooled, _ = reference.encode_prompt(PROMPTS[:2], device="cpu",
                                                    do_classifier_free_guidance=False)
  assert rel_err(cond["context"], context.numpy()) < TOL
  assert rel_err(cond["pooled"], pooled.numpy()) < TOL
  cond["time_ids"] = pipe.time_ids(2, 64, 64)
  x = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32) * 3
  sigma = np.array([0.5, 3.0], np.float32)
  ours = jax.jit(teacher.apply)(tv, x, sigma, cond)
  assert rel_err(ours, jax.jit(pipe.denoiser())(x, sigma, cond)) < TOL


@pytest.mark.slow      # the tiny SDXL pipeline through the CLI
def test_sample_t2i_command_line_samples_sdxl(pipe, folder, tmp_path):
  """`tools.sample_t2i` on the SDXL folder (the family is read from it) writes what
  `sd_sampling.sample` returns; one guided DDIM step from pure noise is the Euler step
  of the guided pytree denoiser (time_ids of the image size, zero negative), which
  test_cfg_denoiser_with_pytree_conditioning checks against diffusers."""
  from fdistill_jax.pipelines import sd_sampling  # pylint: disable=g-import-not-at-top
  from fdistill_jax.tools import cli  # pylint: disable=g-import-not-at-top
  from fdistill_jax.tools import sample_t2i  # pylint: disable=g-import-not-at-top
  size = 4 * pipeline.vae_factor(pipe.vae)
  npz = tmp_path / "s.npz"
  argv = [f"--model={folder}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", "--steps=2",
          "--cfg=3", f"--height={size}", f"--width={size}", "--batch=2", f"--npz={npz}",
          "--seed=4"]
  assert cli.invoke(sample_t2i.main, "sample_t2i", sample_t2i.FLAGS, argv) == 0
  want, _ = sd_sampling.sample(pipe, PROMPTS[:2], steps=2, cfg=3.0, height=size, width=size,
                               seed=4, batch=2, devices=jax.devices()[:1])
  with np.load(npz) as data:
    assert data["images"].shape == (2, size, size, 3)
    np.testing.assert_allclose(data["images"].astype(int), want.astype(int), atol=1)
  lat, _ = sd_sampling.sample(pipe, PROMPTS[:1], steps=1, cfg=3.0, height=size, width=size,
                              decode=False, devices=jax.devices()[:1])
  sigmas = sd_sampling.sampler_sigmas(pipe.schedule, "ddim", 1)
  key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (1, 4, 4, 4)))
  x = noise * np.sqrt(1 + sigmas[0] ** 2)
  cond = {**pipe.encode_prompts(PROMPTS[:1]), "time_ids": pipe.time_ids(1, size, size)}
  uncond = {**pipe.unconditional(1), "time_ids": pipe.time_ids(1, size, size)}
  d = jax.jit(denoiser.cfg_denoiser(pipe.denoiser(), uncond, 3.0))(x, sigmas[0], cond)
  expected = (x + (sigmas[1] - sigmas[0]) * (x - d) / sigmas[0]) / np.sqrt(1 + sigmas[1] ** 2)
  np.testing.assert_allclose(lat, expected, rtol=1e-4, atol=1e-5)
