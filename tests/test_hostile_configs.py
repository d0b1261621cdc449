"""Raw tracebacks, second round (docs/security.md): JSON from files parsed with a size and depth
limit, SD / CLIP configs checked against a schema before any module is built."""

import time

import pytest

from fdistill_jax.io import limits
from fdistill_jax.loaders import sd_configs
from fdistill_jax.loaders import state_dict
from fdistill_jax.pipelines import sd as sd_pipeline
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.loaders.errors import ConversionError


@pytest.mark.parametrize("text, fragment", [
    ("[" * 200_000, "nested more than 64 deep"),
    ('{"a": ' * 65 + "1" + "}" * 65, "nested more than 64 deep"),
    ('{"scaling_factor": NaN}', "NaN is not a JSON number"),
    (b'{"a": "\xff"}', "is not UTF-8 text"),
    ("{'single': 1}", "is not valid JSON"),
])
def test_json_from_files_is_bounded_and_names_the_file(text, fragment):
  with pytest.raises(ValueError) as e:
    limits.json_loads(text, "model/unet/config.json")
  assert str(e.value).startswith("model/unet/config.json") and fragment in str(e.value)
  assert "\n" not in str(e.value)
  assert limits.json_loads('{"a": [1, {"b": 2.5}]}', "x") == {"a": [1, {"b": 2.5}]}
  with pytest.raises(ValueError, match="more than the 10 accepted"):
    limits.json_loads("[1, 2, 3, 4, 5]", "x", max_bytes=10)


def test_readers_of_json_files_refuse_deep_json_in_one_line(tmp_path):
  deep = "[" * 100_000
  (tmp_path / "config.json").write_text(deep)
  with pytest.raises(ConversionError, match=r"config.json is not valid JSON \(nested more"):
    sd_pipeline.read_json(tmp_path / "config.json")
  (tmp_path / "generator_spec.json").write_text(deep)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"spec.json is not valid JSON \(nested"):
    ckpt_lib._read_json(str(tmp_path / "generator_spec.json"), "Generator architecture")
  (tmp_path / "teacher.json").write_text("[1, 2]")
  with pytest.raises(ckpt_lib.CheckpointError, match="must hold a JSON object, got a list"):
    ckpt_lib._read_json(str(tmp_path / "teacher.json"), "Teacher record")


@pytest.mark.parametrize("weight_map", ['["a.safetensors"]', '"a.safetensors"', "7",
                                        '{"w": 3}'])
def test_sharded_index_weight_map_must_map_names_to_files(tmp_path, weight_map):
  index = tmp_path / "model.safetensors.index.json"
  index.write_text('{"weight_map": %s}' % weight_map)
  with pytest.raises(ConversionError, match="index.json"):
    state_dict._read_sharded(index)


UNET = sd_configs.SD15_CONFIGS["unet"]
TEXT = sd_configs.SD15_CONFIGS["text_encoder"]
VAE = sd_configs.SD15_CONFIGS["vae"]
VISION = sd_configs.CLIP_VIT_L14_VISION


@pytest.mark.parametrize("build, config, fragment", [
    (sd_configs.unet_from_config, {**UNET, "layers_per_block": 10000}, "layers_per_block=10000"),
    (sd_configs.unet_from_config, {**UNET, "block_out_channels": [-320, 640, 1280, 1280]},
     "block_out_channels=(-320"),
    (sd_configs.unet_from_config, {**UNET, "block_out_channels": [320.0, 640, 1280, 1280]},
     "block_out_channels=(320.0"),
    (sd_configs.unet_from_config, {**UNET, "block_out_channels": [32] * 64},
     "block_out_channels=(32, 32"),
    (sd_configs.unet_from_config, {**UNET, "norm_num_groups": 0}, "norm_num_groups=0"),
    (sd_configs.unet_from_config, {**UNET, "norm_num_groups": 30}, "does not divide"),
    (sd_configs.unet_from_config, {**UNET, "attention_head_dim": "8"}, "attention_head_dim='8'"),
    (sd_configs.unet_from_config, {**UNET, "cross_attention_dim": True}, "cross_attention_dim"),
    (sd_configs.unet_from_config,
     {**UNET, "block_out_channels": [16384] * 4, "layers_per_block": 16}, "parameters"),
    (sd_configs.vae_from_config, {**VAE, "latent_channels": 0}, "latent_channels=0"),
    (sd_configs.text_from_config, {**TEXT, "num_hidden_layers": 100000}, "num_hidden_layers"),
    (sd_configs.text_from_config, {**TEXT, "num_attention_heads": 7}, "does not divide"),
    (sd_configs.text_from_config, {**TEXT, "hidden_size": -768}, "hidden_size=-768"),
    (sd_configs.text_with_projection_from_config, {**TEXT, "projection_dim": [1]},
     "projection_dim=[1]"),
    (sd_configs.vision_from_config, {**VISION, "patch_size": 0}, "patch_size=0"),
    (sd_configs.vision_from_config, {**VISION, "patch_size": 448}, "larger than image_size"),
])
def test_config_values_are_checked_before_any_module_is_built(build, config, fragment):
  start = time.time()
  with pytest.raises(ConversionError) as e:
    build(config)
  assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert time.time() - start < 1


def test_real_configs_still_build():
  assert sd_configs.unet_from_config(UNET).block_out_channels == (320, 640, 1280, 1280)
  sd_configs.vae_from_config(VAE)
  sd_configs.text_from_config(TEXT)
  sd_configs.vision_from_config(VISION)


@pytest.mark.parametrize("change, fragment", [
    ({"patch_size": 0}, "ViT config: patch_size=0"),
    ({"num_hidden_layers": 100000}, "ViT config: num_hidden_layers=100000"),
    ({"qkv_bias": "yes"}, "ViT config: qkv_bias='yes'"),
    ({"hidden_size": 770}, "does not divide hidden_size=770"),
])
def test_dino_vit_config_is_checked_too(change, fragment):
  from fdistill_jax.metrics.t2i import dino  # pylint: disable=g-import-not-at-top
  assert dino.vit_from_config({}).hidden_size == 768
  with pytest.raises(ConversionError, match=fragment):
    dino.vit_from_config(change)
