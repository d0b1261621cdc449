"""Full-size SD 1.5 parameter counts from the fixtures' config.json (jax.eval_shape, no weights),
and config validation."""

import pathlib
import subprocess
import sys

import jax
import pytest

from fdistill_jax.loaders.errors import ConversionError
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.loaders import variables
from fdistill_jax.pipelines import sd as pipeline
from sd_helpers import FIXTURES, require_fixtures


@pytest.fixture(scope="module")
def sd15():
  require_fixtures()
  return pipeline.read_configs(FIXTURES)


def _count(module, parts=None):
  shapes = names.param_shapes(module)
  return variables.count_params(shapes if parts is None else {k: shapes[k] for k in parts})


def test_full_size_parameter_counts(sd15):
  assert _count(configs.unet_from_config(sd15["unet"])) == 859_520_964
  assert _count(configs.text_from_config(sd15["text_encoder"])) == 123_060_480
  vae = configs.vae_from_config(sd15["vae"])[0]
  assert _count(vae) == 83_653_863
  assert _count(vae, ("encoder", "quant_conv")) == 34_163_664
  assert _count(vae, ("decoder", "post_quant_conv")) == 49_490_199
  assert _count(configs.vision_from_config(configs.CLIP_VIT_L14_VISION)) == 303_966_208


def test_builtin_sd15_configs_equal_the_fixtures(sd15):
  """Single files use SD15_CONFIGS (the 2022 release's keys): the same networks and schedule."""
  for name in ("unet", "vae", "text_encoder"):
    fn = {"unet": configs.unet_from_config, "vae": configs.vae_from_config,
          "text_encoder": configs.text_from_config}[name]
    assert fn(configs.SD15_CONFIGS[name]) == fn(sd15[name]), name
  a = pipeline.build_modules(configs.SD15_CONFIGS)["schedule"]
  b = pipeline.build_modules(sd15)["schedule"]
  assert (a.alphas_cumprod == b.alphas_cumprod).all() and a.steps_offset == b.steps_offset


def test_state_dict_names_round_trip(sd15):
  """Every full-size Flax path maps to a diffusers name and back."""
  shapes = names.param_shapes(configs.unet_from_config(sd15["unet"]))
  keys = [names.torch_key(tuple(p.key for p in path))
          for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  assert len(keys) == 686
  assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight" in keys
  assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.bias" in keys
  assert "time_embedding.linear_1.weight" in keys
  for key in keys:
    assert names.torch_key(names.flax_path(key)) == key


@pytest.mark.parametrize("change, message", [
    ({"act_fn": "gelu"}, r"act_fn='gelu' is not implemented"),
    ({"class_embed_type": "timestep"}, r"class_embed_type='timestep' is not implemented"),
    ({"brand_new_key": 1}, r"keys \['brand_new_key'\] that this port does not know"),
    ({"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["SimpleDownBlock"]},
     r"down_block_types=.*\['SimpleDownBlock'\] is not implemented"),
    ({"layers_per_block": [2, 2, 2, 2]}, r"per-block layers_per_block"),
])
def test_unet_config_refusals_name_the_key(sd15, change, message):
  with pytest.raises(ConversionError, match=message):
    configs.unet_from_config({**sd15["unet"], **change})


def test_vae_and_scheduler_refusals(sd15):
  with pytest.raises(ConversionError, match=r"latents_mean=.*is not implemented"):
    configs.vae_from_config({**sd15["vae"], "latents_mean": [0.1] * 4})
  with pytest.raises(ConversionError, match=r"prediction_type='v_prediction' is not implemented"):
    pipeline.build_modules({**sd15, "scheduler": {**sd15["scheduler"],
                                                  "prediction_type": "v_prediction"}})
  with pytest.raises(ConversionError, match=r"hidden_act='relu' is not implemented"):
    configs.text_from_config({**sd15["text_encoder"], "hidden_act": "relu"})


def test_transformers_bookkeeping_keys_are_skipped(sd15):
  """transformers configs carry generic keys (generation settings...) that do not change CLIP."""
  cfg = {**sd15["text_encoder"], "output_hidden_states": False, "do_sample": False}
  assert configs.text_from_config(cfg) == configs.text_from_config(sd15["text_encoder"])


def test_core_imports_no_torch_or_transformers():
  """The SD package and networks import neither torch nor transformers (the tokenizer does, lazily)."""
  code = ("import sys, fdistill_jax.pipelines.sd, fdistill_jax.tools.sample_t2i, fdistill_jax.models.sd; "
          "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'ftfy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=pathlib.Path(__file__).parents[1])
  assert out.stdout.strip() == "[]", out.stderr[-2000:]
