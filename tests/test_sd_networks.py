"""The Flax SD networks against their PyTorch references (diffusers 0.42, transformers 5).

Tiny random configs, weights written with save_pretrained and read by our loader;
float32 outputs must agree to TOL = 1e-5 relative (max abs error / max abs value).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.models.sd.unet import MID
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.loaders import state_dict as weights
from sd_helpers import (TINY_VISION, TOL, nchw_to_nhwc, perturbed, read_config, rel_err,  # noqa: F401
                        tiny_folder, tiny_models)

torch = pytest.importorskip("torch")


def _load(folder, name, module):
  state_dict, _ = weights.read_component(folder / name, pipeline.WEIGHT_STEMS[name])
  return names.variables_from_state_dict(module, state_dict, name)


@pytest.fixture(scope="module")
def unet(tiny_folder):
  module = configs.unet_from_config(read_config(tiny_folder, "unet"))
  return module, _load(tiny_folder, "unet", module)


def _unet_reference(tiny_models, x, t, context):
  with torch.no_grad():
    out = tiny_models["unet"](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
  return nchw_to_nhwc(out.sample.numpy())


def test_unet_matches_diffusers(unet, tiny_models):
  """Batch 3, non-square 16x12 latents, timesteps 0 to 999 (one fractional), text and zero text;
  the features for discriminator heads come along."""
  module, variables = unet
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 16, 12)).astype(np.float32)
  t = np.array([0.0, 421.5, 999.0], np.float32)
  fn = jax.jit(lambda v, x, t, c: module.apply(v, x, t, c, feature_resolutions=(16, 8, MID)))
  for context in (rng.standard_normal((3, 7, 32)).astype(np.float32),
                  np.zeros((3, 7, 32), np.float32)):
    ours, feats = fn(variables, nchw_to_nhwc(x), t, context)
    assert rel_err(ours, _unet_reference(tiny_models, x, t, context)) < TOL
  assert {k: v.shape for k, v in feats.items()} == {
      16: (3, 16, 12, 16), 8: (3, 8, 6, 32), MID: (3, 4, 3, 32)}
  with pytest.raises(ValueError, match=r"includes \[32\].*offers \[0, 4, 8, 16\]"):
    jax.eval_shape(lambda v: module.apply(v, nchw_to_nhwc(x), t, context,
                                          feature_resolutions=(32,)), variables)


def test_unet_odd_latents_match_diffusers(unet, tiny_models):
  """Sizes that do not halve evenly: diffusers upsamples to the skip's size, so do we."""
  module, variables = unet
  x = np.random.default_rng(1).standard_normal((1, 4, 10, 7)).astype(np.float32)
  context = np.random.default_rng(2).standard_normal((1, 3, 32)).astype(np.float32)
  t = np.array([500.0], np.float32)
  ours = jax.jit(module.apply)(variables, nchw_to_nhwc(x), t, context)
  assert rel_err(ours, _unet_reference(tiny_models, x, t, context)) < TOL


def test_unet_bf16_and_remat(unet, tiny_folder, tiny_models):
  """bf16 compute stays close to the reference; remat keeps the parameter tree and the values."""
  _, variables = unet
  cfg = read_config(tiny_folder, "unet")
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, context = np.array([10.0, 700.0], np.float32), rng.standard_normal((2, 5, 32)).astype(np.float32)
  ref = _unet_reference(tiny_models, x, t, context)
  run = lambda m: jax.jit(m.apply)(variables, nchw_to_nhwc(x), t, context)
  bf16 = run(configs.unet_from_config(cfg, dtype=jnp.bfloat16))
  assert bf16.dtype == jnp.float32 and rel_err(bf16, ref) < 5e-2
  remat = configs.unet_from_config(cfg, remat=True)
  assert jax.tree.structure(names.param_shapes(remat)) == jax.tree.structure(variables["params"])
  assert rel_err(run(remat), ref) < TOL


def test_text_encoder_remat_gradients(tiny_folder):
  """nn.remat on the CLIP layers: same gradients (and the same parameter tree)."""
  cfg = read_config(tiny_folder, "text_encoder")
  plain, remat = configs.text_from_config(cfg), configs.text_from_config(cfg, remat=True)
  variables = _load(tiny_folder, "text_encoder", plain)
  ids = jnp.asarray(np.arange(10)[None] + 100, jnp.int32)
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ids)[1] ** 2)
  g_ref = jax.jit(jax.grad(loss(plain)))(variables["params"])
  g_remat = jax.jit(jax.grad(loss(remat)))(variables["params"])
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vae_matches_diffusers(tiny_folder, tiny_models):
  vae, scale, shift = configs.vae_from_config(read_config(tiny_folder, "vae"))
  assert (scale, shift) == (0.18215, 0.0)
  variables = _load(tiny_folder, "vae", vae)
  x = np.random.default_rng(4).uniform(-1, 1, (2, 3, 16, 12)).astype(np.float32)
  with torch.no_grad():
    post = tiny_models["vae"].encode(torch.from_numpy(x)).latent_dist
    decoded = tiny_models["vae"].decode(post.mean).sample.numpy()
  mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method="encode"))(variables, nchw_to_nhwc(x))
  assert rel_err(mean, nchw_to_nhwc(post.mean.numpy())) < TOL
  assert rel_err(logvar, nchw_to_nhwc(post.logvar.numpy())) < TOL
  ours = jax.jit(lambda v, z: vae.apply(v, z, method="decode"))(variables, mean)
  assert rel_err(ours, nchw_to_nhwc(decoded)) < TOL


def test_text_encoder_matches_transformers(tiny_folder, tiny_models):
  """Batch of 3 with end tokens at different positions: last hidden state and pooled output."""
  text = configs.text_from_config(read_config(tiny_folder, "text_encoder"))
  variables = _load(tiny_folder, "text_encoder", text)
  ids = np.full((3, 77), 49407, np.int64)
  ids[:, 0] = 49406
  ids[0, 1:4] = [320, 1125, 539]
  ids[2, 1:76] = np.arange(1000, 1075)
  with torch.no_grad():
    out = tiny_models["text_encoder"](torch.from_numpy(ids))
  hidden, pooled = jax.jit(text.apply)(variables, ids)
  assert rel_err(hidden, out.last_hidden_state.numpy()) < TOL
  assert rel_err(pooled, out.pooler_output.numpy()) < TOL


def test_text_encoder_legacy_eos_pooling(tiny_folder):
  """Configs with eos_token_id = 2 (pre-2023) pool at the largest id, as transformers does."""
  cfg = {**read_config(tiny_folder, "text_encoder"), "eos_token_id": 2}
  text = configs.text_from_config(cfg)
  variables = _load(tiny_folder, "text_encoder", text)
  ids = np.array([[49406, 320, 49407, 5, 5]])
  hidden, pooled = jax.jit(text.apply)(variables, ids)
  np.testing.assert_array_equal(pooled, hidden[:, 2])


def test_vision_matches_transformers(tmp_path):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = perturbed(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)))
  model.save_pretrained(tmp_path)
  vision = configs.vision_from_config(pipeline.read_json(tmp_path / "config.json"))
  variables = names.variables_from_state_dict(vision, weights.read_component(tmp_path, ("model",))[0])
  x = np.random.default_rng(5).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    out = model(torch.from_numpy(x))
  embeds, hidden = jax.jit(vision.apply)(variables, nchw_to_nhwc(x))
  assert rel_err(embeds, out.image_embeds.numpy()) < TOL
  assert rel_err(hidden, out.last_hidden_state.numpy()) < TOL
