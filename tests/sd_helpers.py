"""Tiny Stable Diffusion components made with the PyTorch references, for the SD tests.

Random weights (perturbed away from the references' zero/one inits so no layer
is trivial) saved with `save_pretrained` in the diffusers folder layout, next
to the real SD 1.5 scheduler config and CLIP tokenizer files of the fixtures.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from conftest import FIXTURES_ENV, SHARED_FIXTURES  # pylint: disable=wrong-import-position

FIXTURES = SHARED_FIXTURES / "sd15"
TOL = 1e-5  # max |ours - reference| / max |reference|, float32.

TINY_UNET = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, in_channels=4, out_channels=4, sample_size=8)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=16)
# Full CLIP vocabulary so that the real tokenizer's ids are valid.
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=7, projection_dim=16)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def perturbed(model, seed=0, scale=0.05):
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def torch_models(seed=0):
  """{'unet', 'vae', 'text_encoder'}: tiny random PyTorch reference models."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return {"unet": perturbed(UNet2DConditionModel(**TINY_UNET), seed),
          "vae": perturbed(AutoencoderKL(**TINY_VAE), seed + 1),
          "text_encoder": perturbed(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), seed + 2)}


def write_folder(root, models, safe_serialization=True):
  """A diffusers model folder: the tiny networks, SD 1.5's scheduler config and tokenizer
  (copied from the fixtures: skips the test without them)."""
  require_fixtures()
  root = pathlib.Path(root)
  for name, model in models.items():
    model.save_pretrained(root / name, safe_serialization=safe_serialization)
  for name in ("tokenizer", "scheduler"):   # the fixtures are read-only; the copies are not
    shutil.copytree(FIXTURES / name, root / name, copy_function=shutil.copyfile)
    (root / name).chmod(0o755)
  return root


def require_fixtures():
  if not FIXTURES.is_dir():
    pytest.skip(f"SD 1.5 fixtures not found at {FIXTURES}: check out the shared/ folder "
                f"or set {FIXTURES_ENV}=/path/to/fixtures.")


@pytest.fixture(scope="session")
def tiny_models():
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")
  return torch_models()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_models):
  require_fixtures()
  return write_folder(tmp_path_factory.mktemp("sd_tiny"), tiny_models)


def read_config(folder, name):
  return json.loads((pathlib.Path(folder) / name / "config.json").read_text())


def ldm_checkpoint(parts, unet, vae) -> dict:
  """Inverse of `ldm.split_checkpoint` (ema=False), for tests: diffusers-named parts
  {'unet', 'vae', 'text_encoder'} -> one LDM single-file state dict."""
  from fdistill_jax.loaders import ldm  # pylint: disable=g-import-not-at-top
  invert = lambda module_map: {ours: (theirs, {new: old for old, new in inner.items()})
                               for theirs, (ours, inner) in module_map.items()}
  out = {}
  unet_inv, vae_inv = invert(ldm.unet_module_map(unet)), invert(ldm.vae_module_map(vae))
  for key, value in parts["unet"].items():
    out[ldm.UNET_PREFIX + ldm._rename(key, unet_inv, "U-Net")] = value  # pylint: disable=protected-access
  for key, value in parts["vae"].items():
    value = np.asarray(value)
    if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
      value = value[:, :, None, None]
    out[ldm.VAE_PREFIX + ldm._rename(key, vae_inv, "VAE")] = value  # pylint: disable=protected-access
  for key, value in parts["text_encoder"].items():
    out[ldm.TEXT_PREFIX + key] = value
  return out
