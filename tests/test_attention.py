"""Attention kernels (`fdistill_jax.models.attention`): every implementation that runs on
this machine against an independent float64 numpy attention, the 'xla' setting bitwise
against the attention code the networks computed before the kernels were selectable, and
`auto` choosing the reference on CPU.

Tolerances (max abs error against float64, inputs ~N(0, 1)): float32 2e-5; bfloat16
3e-2 (8 mantissa bits: one rounding of q, k, v, the weights and the output is about
4e-3 each, summed over a few terms).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.models import attention as attention_lib
from fdistill_jax.models import layers as edm_layers
from fdistill_jax.models.sd import layers as sd_layers

# Head sizes: SD 1.5 U-Net 40/80/160; SDXL U-Net, CLIP L and bigG, DINO ViT-B, ADM 64;
# DDPM++ (CIFAR-10, one head of 256); the SD VAE's single head of 512.
HEAD_SIZES = (40, 64, 80, 160, 256, 512)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
RUNS_HERE = ("xla", "jax", "auto")


def numpy_attention(q, k, v, causal):
  """float64 softmax(q k^T / sqrt(d)) v on [B, L, H, d] arrays."""
  q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def old_sd_attention(q, k, v, heads, causal=False):
  """models/sd/layers.attention as it was before the kernels became selectable."""
  b, lq, c = q.shape
  d = c // heads
  q = q.reshape(b, lq, heads, d)
  k = k.reshape(b, k.shape[1], heads, d)
  v = v.reshape(b, v.shape[1], heads, d)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(d).astype(np.float32)
  if causal:
    logits = jnp.where(np.tril(np.ones((lq, k.shape[1]), bool)), logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, heads * d)


def old_edm_attention(qkv, num_heads):
  """models/layers.attention (EDM) as it was before the kernels became selectable."""
  b, h, w, c3 = qkv.shape
  d = c3 // (3 * num_heads)
  qkv = qkv.reshape(b, h * w, num_heads, d, 3)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
  weights = jax.nn.softmax(logits / np.sqrt(d), axis=-1).astype(qkv.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, h, w, num_heads * d)


def _qkv(d, dtype, lq=12, lk=12, heads=2, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed + d), 3)
  shapes = ((1, lq, heads, d), (1, lk, heads, d), (1, lk, heads, d))
  return [jax.random.normal(kk, s).astype(dtype) for kk, s in zip(keys, shapes)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_implementation_here_matches_float64(dtype, causal):
  for d in HEAD_SIZES:
    q, k, v = _qkv(d, dtype)
    want = numpy_attention(q, k, v, causal)
    flat = lambda a: a.reshape(*a.shape[:2], -1)
    for setting in RUNS_HERE:
      got = sd_layers.attention(flat(q), flat(k), flat(v), 2, causal, setting)
      err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want).max()
      assert got.dtype == dtype and err < TOL[dtype], (setting, d, err)
    for impl in ("jax", "jax_xla"):     # jax.nn.dot_product_attention, implementation None / 'xla'
      got = attention_lib.fused(q, k, v, impl, causal)
      err = np.abs(np.asarray(got, np.float64) - want).max()
      assert err < TOL[dtype], (impl, d, err)


def test_cross_attention_lengths_match_float64():
  """SD's cross-attention: 64 latent tokens attend to 77 text tokens."""
  q, k, v = _qkv(40, jnp.float32, lq=64, lk=77, heads=8)
  want = numpy_attention(q, k, v, False)
  got = attention_lib.fused(q, k, v, "jax")
  assert np.abs(np.asarray(got) - want).max() < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_xla_setting_is_bitwise_the_old_attention(dtype, causal):
  for d in (40, 64, 512):
    q, k, v = (a.reshape(1, 12, -1) for a in _qkv(d, dtype))
    new = sd_layers.attention(q, k, v, 2, causal, "xla")
    np.testing.assert_array_equal(np.asarray(new, np.float32),
                                  np.asarray(old_sd_attention(q, k, v, 2, causal), np.float32))
  qkv = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3 * 2 * 64)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(edm_layers.attention(qkv, 2, "xla"), np.float32),
                                np.asarray(old_edm_attention(qkv, 2), np.float32))


def test_edm_attention_kernels_match_the_reference():
  qkv = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3 * 256))
  ref = edm_layers.attention(qkv, 1, "xla")
  for setting in ("jax", "auto"):
    np.testing.assert_allclose(edm_layers.attention(qkv, 1, setting), ref, atol=2e-5)


def test_auto_selects_the_reference_on_cpu():
  assert jax.default_backend() == "cpu"
  for dtype in (jnp.float32, jnp.bfloat16):
    impl, reason = attention_lib.choose("auto", (1, 4096, 8, 40), 4096, dtype)
    assert impl == "xla" and "GPU" in reason and "TPU" in reason, reason


def test_auto_picks_the_fused_kernel_where_it_applies():
  """The choice on other backends, with the backend named (no GPU or TPU needed)."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention_lib.choose("auto", (1, 4096, 8, 64), 4096, bf16, "tpu")[0] == "pallas"
  assert attention_lib.choose("auto", (1, 4096, 8, 64), 77, bf16, "tpu")[0] == "xla"
  assert attention_lib.unsupported("cudnn", (1, 4096, 8, 64), 77, f32, "gpu") is not None
  assert attention_lib.unsupported("cudnn", (1, 4096, 8, 60), 77, bf16, "gpu") is not None


def test_explicit_kernel_on_the_wrong_backend_fails_with_the_fix():
  with pytest.raises(ValueError, match="attention=auto"):
    attention_lib.choose("cudnn", (1, 16, 2, 64), 16, jnp.bfloat16)
  with pytest.raises(ValueError, match="not an attention implementation"):
    attention_lib.check_setting("flash2")


def _kernels_traced(module, *args):
  """The implementations `module` runs at its attentions (traced only: eval_shape)."""
  attention_lib.traced_calls(clear=True)
  jax.eval_shape(lambda *a: module.init_with_output(jax.random.PRNGKey(0), *a), *args)
  return {call[0:2] for call in attention_lib.traced_calls()}


def test_every_network_passes_the_setting_down():
  """SD U-Net, VAE, CLIP text, DINO ViT and both EDM U-Nets run the kernel they are given."""
  from fdistill_jax.loaders import sd_configs  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models import edm  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models import vit  # pylint: disable=g-import-not-at-top
  unet = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
          "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
          "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
          "attention_head_dim": 2}
  vae = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
         "norm_num_groups": 4, "latent_channels": 4}
  text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2}
  edm_archs = [dict(model_type="SongUNet", img_resolution=8, img_channels=3, model_channels=16,
                    channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4]),
               dict(model_type="DhariwalUNet", img_resolution=8, img_channels=3,
                    model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4])]
  setting = "jax"     # every module's default is 'xla': a dropped setting shows as 'xla'
  cases = [
      (sd_configs.unet_from_config(unet, attention=setting),
       jnp.ones((1, 8, 8, 4)), jnp.ones((1,)), jnp.ones((1, 5, 16))),
      (sd_configs.vae_from_config(vae, attention=setting)[0], jnp.ones((1, 16, 16, 3))),
      (sd_configs.text_from_config(text, attention=setting), jnp.ones((1, 7), jnp.int32)),
      (vit.ViTModel(32, 1, 2, 64, image_size=16, patch_size=8, attention=setting),
       jnp.ones((1, 16, 16, 3))),
  ] + [(edm.build_edm(a, attention=setting), jnp.ones((1, 8, 8, 3)), jnp.ones((1,)))
       for a in edm_archs]
  for module, *args in cases:
    assert _kernels_traced(module, *args) == {(setting, setting)}, type(module).__name__
