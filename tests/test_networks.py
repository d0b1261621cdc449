"""Tests for fdistill_jax.models: EDM reference outputs, parameter counts, options."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax.models.edm import CIFAR10_ARCH
from fdistill_jax.models.edm import DHARIWAL_TINY_ARCH
from fdistill_jax.models.edm import IMAGENET64_ARCH
from fdistill_jax.models.edm import SONGUNET_TINY_ARCH
from fdistill_jax.models.edm import build_edm
from fdistill_jax.loaders.edm_variables import count_params
from fdistill_jax.loaders.edm_variables import random_variables
from fdistill_jax.loaders.edm_variables import variable_shapes
from fdistill_jax.loaders.edm_variables import variables_from_state_dict
from fdistill_jax.models import layers

FIXTURES = ("songunet_tiny", "songunet_tiny_uncond", "dhariwal_tiny")
SIGMA = np.array([0.002, 0.5, 3.0, 80.0], np.float32)


def _load(fixtures_dir, name):
  arch = json.loads((fixtures_dir / f"{name}_config.json").read_text())
  state = dict(np.load(fixtures_dir / f"{name}_weights.npz"))
  io = dict(np.load(fixtures_dir / f"{name}_io.npz"))
  return arch, state, io


def _rel_err(a, b):
  """Per-sample max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  axes = tuple(range(1, a.ndim))
  return np.abs(a - b).max(axis=axes) / np.abs(b).max(axis=axes)


def _nchw_to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


# Micro variants for option tests (compile in about a second on CPU).
SONG_MICRO = dict(SONGUNET_TINY_ARCH, img_resolution=8, model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
DHARIWAL_MICRO = dict(DHARIWAL_TINY_ARCH, img_resolution=8, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4])


def _tiny_inputs(arch, batch=4, seed=0):
  r, c = arch["img_resolution"], arch["img_channels"]
  x = jax.random.normal(jax.random.key(seed), (batch, r, r, c))
  labels = None
  if arch.get("label_dim"):
    labels = jax.nn.one_hot(jnp.arange(batch) % arch["label_dim"], arch["label_dim"])
  return x, jnp.asarray(SIGMA[:batch]), labels


def _init(arch, seed=0, **kwargs):
  """Net and random variables like the EDM fixtures' (no zero-initialised layers)."""
  net = build_edm(arch, **kwargs)
  return net, random_variables(net, seed)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_edm_reference_outputs(edm_fixtures, name):
  arch, state, io = _load(edm_fixtures, name)
  variables = variables_from_state_dict(arch, state)
  net = build_edm(arch)
  out = jax.jit(net.apply)(variables, _nchw_to_nhwc(io["x_nchw"]), io["sigma"],
                           io.get("class_labels"))
  ref = _nchw_to_nhwc(io["denoised_nchw"])
  # float32 vs EDM's float32 torch on CPU: 1e-5 of each sample's scale (seen: <2e-6).
  np.testing.assert_array_less(_rel_err(out, ref), 1e-5)


def test_full_size_parameter_counts_match_edm():
  # EDM's own counts (parameters only, buffers excluded), from eval_shape.
  assert count_params(CIFAR10_ARCH) == 55_735_299
  assert count_params(IMAGENET64_ARCH) == 295_899_267


def test_bfloat16_compute_stays_close_to_float32(edm_fixtures):
  arch, state, io = _load(edm_fixtures, "dhariwal_tiny")
  variables = variables_from_state_dict(arch, state)
  net = build_edm(arch, dtype=jnp.bfloat16)
  out = jax.jit(net.apply)(variables, _nchw_to_nhwc(io["x_nchw"]), io["sigma"],
                           io["class_labels"])
  ref = _nchw_to_nhwc(io["denoised_nchw"])  # EDM in float32.
  assert out.dtype == jnp.float32
  err = _rel_err(out, ref)
  # bfloat16 keeps 8 mantissa bits (rounding 2^-9 ~ 0.2%); through ~25 layers of
  # random weights the output drifts by up to 2.1% of its scale (measured): allow 3%.
  np.testing.assert_array_less(err, 0.03)
  assert err.max() > 1e-4  # bf16 compute really happened (float32 gives < 2e-6).


@pytest.mark.parametrize("arch,last_block", [(SONG_MICRO, "4x4_block0"),
                                              (DHARIWAL_MICRO, "4x4_block0")],
                         ids=["songunet", "dhariwal"])
def test_feature_extraction(arch, last_block):
  net, variables = _init(arch)
  x, sigma, labels = _tiny_inputs(arch)

  @jax.jit
  def run(variables):
    plain = net.apply(variables, x, sigma, labels)
    out, feats = net.apply(variables, x, sigma, labels, feature_resolutions=(8, 4))
    _, state = net.apply(variables, x, sigma, labels, capture_intermediates=True,
                         mutable=["intermediates"])
    block = state["intermediates"]["model"]["enc"][last_block]["__call__"][0]
    return plain, out, feats, block

  plain, out, feats, block = run(variables)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  mc, mult = arch["model_channels"], arch["channel_mult"]
  for level, res in enumerate((8, 4)):
    assert feats[res].shape == (4, res, res, mc * mult[level])
  # features[4] is the output of the last encoder block at 4x4, read independently.
  np.testing.assert_array_equal(np.asarray(feats[4]), np.asarray(block))
  with pytest.raises(ValueError, match=r"\[8, 4\]"):
    jax.eval_shape(lambda: net.apply(variables, x, sigma, labels, feature_resolutions=(16,)))


def test_dropout_only_in_train_mode_with_rng():
  arch = SONG_MICRO  # dropout=0.13
  net, variables = _init(arch)
  x, sigma, labels = _tiny_inputs(arch)

  @jax.jit
  def run(variables):
    base = net.apply(variables, x, sigma, labels)
    rngs = {"dropout": jax.random.key(1)}
    eval_rng = net.apply(variables, x, sigma, labels, rngs=rngs)
    d1 = net.apply(variables, x, sigma, labels, train=True, rngs=rngs)
    d2 = net.apply(variables, x, sigma, labels, train=True, rngs={"dropout": jax.random.key(2)})
    return base, eval_rng, d1, d2

  base, eval_rng, d1, d2 = run(variables)
  np.testing.assert_array_equal(np.asarray(eval_rng), np.asarray(base))
  assert np.abs(np.asarray(d1 - base)).max() > 1e-4
  assert np.abs(np.asarray(d1 - d2)).max() > 1e-4


def test_label_dropout_drops_labels_in_train_mode():
  arch = dict(DHARIWAL_MICRO, dropout=0.0, label_dropout=1.0)
  net, variables = _init(arch)
  x, sigma, labels = _tiny_inputs(arch)

  @jax.jit
  def run(variables):
    train = net.apply(variables, x, sigma, labels, train=True,
                      rngs={"dropout": jax.random.key(0)})
    return (train, net.apply(variables, x, sigma, jnp.zeros_like(labels)),
            net.apply(variables, x, sigma, labels))

  train, unconditional, conditional = run(variables)
  # With probability 1 every label is dropped, i.e. replaced by zeros.
  np.testing.assert_allclose(np.asarray(train), np.asarray(unconditional), atol=1e-6)
  assert np.abs(np.asarray(conditional - unconditional)).max() > 1e-4


def test_augment_labels_default_to_zeros():
  arch = dict(SONG_MICRO, augment_dim=9)
  net, variables = _init(arch, seed=1)
  x, sigma, labels = _tiny_inputs(arch)

  @jax.jit
  def run(variables):
    return (net.apply(variables, x, sigma, labels),
            net.apply(variables, x, sigma, labels, augment_labels=jnp.zeros((4, 9))),
            net.apply(variables, x, sigma, labels, augment_labels=jnp.ones((4, 9))))

  none, zeros, ones = run(variables)
  np.testing.assert_array_equal(np.asarray(none), np.asarray(zeros))
  assert np.abs(np.asarray(ones - zeros)).max() > 1e-4


def test_state_dict_mismatches_raise(edm_fixtures):
  arch, state, _ = _load(edm_fixtures, "songunet_tiny")
  bad = dict(state)
  del bad["model.map_layer0.bias"]
  bad["model.enc.16x16_block0.conv9.weight"] = np.zeros((1,), np.float32)
  bad["model.map_layer1.weight"] = np.zeros((64, 128), np.float32)
  with pytest.raises(ValueError) as err:
    variables_from_state_dict(arch, bad)
  msg = str(err.value)
  assert "missing: model.map_layer0.bias" in msg
  assert "unexpected: model.enc.16x16_block0.conv9.weight" in msg
  assert "model.map_layer1.weight: got (128, 64) (Flax layout), expected (128, 128)" in msg
  filt = dict(state)
  filt["model.enc.8x8_down.conv0.resample_filter"] = np.full((1, 1, 2, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match="resample_filter"):
    variables_from_state_dict(arch, filt)
  with pytest.raises(ValueError, match="Unknown SongUNet arch keys"):
    build_edm(dict(arch, nonsense=1))


NCSNPP_MICRO = dict(SONG_MICRO, embedding_type="fourier", channel_mult_noise=2,
                    encoder_type="residual", decoder_type="skip", resample_filter=[1, 3, 3, 1],
                    augment_dim=9)


def _torch_shape(flax_shape):
  """PyTorch layout of a Flax shape: HWIO -> OIHW, [in, out] -> [out, in]."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


@pytest.mark.parametrize("encoder_type", ["skip", "residual"])
def test_ncsnpp_state_dict_layouts(encoder_type):
  """Fake EDM state dict for the NCSN++ options (no EDM fixture covers them): every
  value, the Fourier `freqs` buffer included, must land in Flax layout, and the
  network must run. Resampling with [1, 3, 3, 1] is checked against torch below."""
  arch = dict(NCSNPP_MICRO, encoder_type=encoder_type)
  shapes = variable_shapes(arch)
  rng = np.random.default_rng(0)
  state, flax_expect = {}, {}
  for collection, tree in shapes.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = ".".join(p.key for p in path)
      state[name] = rng.normal(size=_torch_shape(leaf.shape)).astype(np.float32)
      flax_expect[(collection, name)] = state[name]
  assert "model.map_noise.freqs" in state and "model.enc.4x4_aux_" + (
      "skip" if encoder_type == "skip" else "residual") + ".weight" in state
  state["model.dec.8x8_aux_up.resample_filter"] = (
      np.outer([1, 3, 3, 1], [1, 3, 3, 1])[None, None] / 64.0).astype(np.float32)
  variables = variables_from_state_dict(arch, state)
  for (collection, name), value in flax_expect.items():
    got = np.asarray(_get(variables[collection], name.split(".")))
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    np.testing.assert_array_equal(got, value)
  net = build_edm(arch)
  x, sigma, labels = _tiny_inputs(arch)
  out, feats = jax.jit(net.apply, static_argnames="feature_resolutions")(
      variables, x, sigma, labels, feature_resolutions=(4,))
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  assert feats[4].shape == (4, 4, 4, 32)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _torch_conv_reference(x_nhwc, w_hwio, filt, up, down, fused):
  """EDM's Conv2d computation written with torch.nn.functional (NCHW)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = torch.from_numpy(np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2)).copy())
  w = torch.from_numpy(np.transpose(np.asarray(w_hwio), (3, 2, 0, 1)).copy())
  f1 = torch.tensor(filt, dtype=torch.float32)
  f = (torch.outer(f1, f1) / f1.sum() ** 2)[None, None]
  cin, w_pad, f_pad = x.shape[1], w.shape[-1] // 2, (f.shape[-1] - 1) // 2
  if fused and up:
    x = F.conv_transpose2d(x, (4 * f).tile([cin, 1, 1, 1]), groups=cin, stride=2,
                           padding=w_pad + f_pad)
    x = F.conv2d(x, w)
  elif fused and down:
    x = F.conv2d(x, w, padding=w_pad + f_pad)
    x = F.conv2d(x, f.tile([w.shape[0], 1, 1, 1]), groups=w.shape[0], stride=2)
  else:
    if up:
      x = F.conv_transpose2d(x, (4 * f).tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=f_pad)
    if down:
      x = F.conv2d(x, f.tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=f_pad)
    x = F.conv2d(x, w, padding=w_pad)
  return np.transpose(x.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode", ["up", "down", "fused_up", "fused_down"])
def test_resampling_conv_matches_torch(filt, mode):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  conv = layers.Conv2d(5, 3, use_bias=False, up="up" in mode, down="down" in mode,
                       resample_filter=filt, fused_resample=mode.startswith("fused"))
  params = conv.init(jax.random.key(1), x)
  out = conv.apply(params, x)
  ref = _torch_conv_reference(x, params["params"]["weight"], filt, "up" in mode, "down" in mode,
                              mode.startswith("fused"))
  # Same float32 arithmetic in a different order: 1e-5 of the output scale.
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
