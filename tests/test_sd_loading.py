"""Loading SD weights safely: folders (.safetensors, .bin), lying or hostile files, LDM single files."""

import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import jax
import numpy as np
import pytest

from fdistill_jax.loaders.errors import ConversionError
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import ldm
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.pipelines import sd as pipeline
from fdistill_jax.loaders import state_dict as weights
from sd_helpers import FIXTURES, ldm_checkpoint, require_fixtures, tiny_folder, tiny_models, write_folder  # noqa: F401

torch = pytest.importorskip("torch")


def _safetensors_bytes(header, data=b""):
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data


def _write(path, payload):
  path.write_bytes(payload)
  return path


def _assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_pipe(tiny_folder):
  return pipeline.load_pipeline(tiny_folder)


# ----------------------------------------------------------------------------
# safetensors reader.


def test_reader_equals_safetensors_library(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((0, 4), np.float16),
            "c": np.array(3, np.int64), "d": np.arange(5, dtype=np.uint8)}
  save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
  out = weights.read_safetensors(tmp_path / "x.safetensors")
  assert sorted(out) == sorted(arrays)
  for k, v in arrays.items():
    assert out[k].dtype == v.dtype
    np.testing.assert_array_equal(out[k], v)


LYING_HEADERS = [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1_000_000]}},
     r"'w' claims bytes \[0, 1000000\) but the data section has 8 bytes"),
    ({"w": {"dtype": "F32", "shape": [10**6, 10**6, 10**6], "data_offsets": [0, 8]}},
     r"'w' of shape \[1000000, 1000000, 1000000\] \(F32\) needs 4000000000000000000 bytes"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
     r"lists of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, r"overlap"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, r"has dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"must have exactly dtype, shape and data_offsets"),
]


@pytest.mark.parametrize("header, message", LYING_HEADERS)
def test_lying_headers_are_refused_before_allocating(tmp_path, header, message):
  path = _write(tmp_path / "lie.safetensors", _safetensors_bytes(header, b"\0" * 8))
  tracemalloc.start()
  try:
    with pytest.raises(ConversionError, match=message):
      weights.read_safetensors(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 256 * 1024, peak   # the file is ~150 bytes; no tensor was allocated


def test_lying_header_length_and_truncation(tmp_path):
  path = _write(tmp_path / "a.safetensors", struct.pack("<Q", 2**40) + b"{}")
  with pytest.raises(ConversionError, match=r"header claims 1099511627776 bytes but the file has 2"):
    weights.read_safetensors(path)
  path = _write(tmp_path / "b.safetensors", b"\1\0")
  with pytest.raises(ConversionError, match="too short"):
    weights.read_safetensors(path)
  path = _write(tmp_path / "c.safetensors", _safetensors_bytes([1, 2]))
  with pytest.raises(ConversionError, match="must be a JSON object"):
    weights.read_safetensors(path)


def test_valid_read_allocates_at_most_the_file_size(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({f"t{i}": np.ones((256, 256), np.float32) for i in range(4)}, str(tmp_path / "x.safetensors"))
  size = os.path.getsize(tmp_path / "x.safetensors")
  tracemalloc.start()
  try:
    weights.read_safetensors(tmp_path / "x.safetensors")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < size + 256 * 1024, (peak, size)


def test_bfloat16_and_sharded_index_refusals(tmp_path):
  """BF16 tensors come back as numpy bfloat16 equal to torch's; an index may name only shard
  files of its own folder, never another index."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  t = torch.linspace(-3, 3, 7, dtype=torch.bfloat16)
  save_file({"w": t}, str(tmp_path / "bf.safetensors"))
  out = weights.read_state_dict(tmp_path / "bf.safetensors")["w"]
  assert out.dtype.name == "bfloat16"
  np.testing.assert_array_equal(out.astype(np.float32), t.float().numpy())
  for target, message in (("../bf.safetensors", "outside its folder"),
                          ("other.safetensors.index.json", "other indexes")):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": target}}))
    with pytest.raises(ConversionError, match=message):
      weights.read_state_dict(index)


# ----------------------------------------------------------------------------
# Model folders.


def test_bin_folder_loads_like_safetensors(tmp_path, tiny_models, reference_pipe):
  folder = write_folder(tmp_path / "bin", tiny_models, safe_serialization=False)
  assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
  pipe = pipeline.load_pipeline(folder)
  _assert_same_variables(pipe.variables, reference_pipe.variables)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _hostile_archive(marker):
  data = pickle.dumps({"conv_in.weight": _Exploit(marker)}, protocol=2)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", data)
  return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_hostile_bin_is_refused_and_not_executed(tmp_path, tiny_models, kind):
  folder = write_folder(tmp_path / "m", tiny_models, safe_serialization=False)
  marker = tmp_path / "pwned"
  payload = (_hostile_archive(marker) if kind == "zip" else
             pickle.dumps(_Exploit(marker), protocol=2))
  _write(folder / "vae" / "diffusion_pytorch_model.bin", payload)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(ConversionError,
                     match=r"diffusion_pytorch_model.bin: refused .*refusing to load global "
                           r"'posix.system'.*nothing was executed"):
    pipeline.load_pipeline(folder)
  assert not marker.exists()
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_mismatched_keys_and_shapes_are_named(tmp_path, tiny_models):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = write_folder(tmp_path / "m", tiny_models)
  path = folder / "unet" / "diffusion_pytorch_model.safetensors"
  sd = weights.read_safetensors(path)
  sd["conv_in.weightt"] = sd.pop("conv_in.weight")
  sd["conv_out.bias"] = np.zeros(7, np.float32)
  save_file(sd, str(path))
  before = sorted(os.listdir(folder / "unet"))
  with pytest.raises(ConversionError) as e:
    pipeline.load_pipeline(folder)
  msg = str(e.value)
  assert "unet" in msg and "1 missing: conv_in.weight" in msg
  assert "1 unexpected: conv_in.weightt" in msg
  assert "conv_out.bias: got (7,) (Flax layout), expected (4,)" in msg
  assert sorted(os.listdir(folder / "unet")) == before


def test_missing_weights_are_a_clear_error(tmp_path, tiny_models):
  folder = write_folder(tmp_path / "m", tiny_models)
  (folder / "text_encoder" / "model.safetensors").unlink()
  with pytest.raises(ConversionError, match=r"text_encoder: no weights found; looked for "
                                            r"\['model.safetensors'"):
    pipeline.load_pipeline(folder)


# ----------------------------------------------------------------------------
# Single-file LDM checkpoints.

# Entries of the real v1-5-pruned-emaonly checkpoint, with the diffusers names they must get.
SD15_LDM_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": "unet/conv_in.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight": "unet/down_blocks.0.downsamplers.0.conv.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight":
        "unet/down_blocks.1.resnets.0.conv_shortcut.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.bias": "unet/down_blocks.3.resnets.1.time_emb_proj.bias",
    "model.diffusion_model.middle_block.1.proj_in.weight": "unet/mid_block.attentions.0.proj_in.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight": "unet/mid_block.resnets.1.conv2.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight": "unet/up_blocks.0.upsamplers.0.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight": "unet/up_blocks.1.upsamplers.0.conv.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight":
        "unet/up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.out.2.bias": "unet/conv_out.bias",
    "model.diffusion_model.time_embed.2.weight": "unet/time_embedding.linear_2.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight":
        "vae/encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight":
        "vae/encoder.down_blocks.2.downsamplers.0.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight": "vae/encoder.mid_block.attentions.0.to_q.weight",
    "first_stage_model.decoder.up.0.block.2.conv1.weight": "vae/decoder.up_blocks.3.resnets.2.conv1.weight",
    "first_stage_model.decoder.up.3.upsample.conv.bias": "vae/decoder.up_blocks.0.upsamplers.0.conv.bias",
    "first_stage_model.decoder.norm_out.weight": "vae/decoder.conv_norm_out.weight",
    "first_stage_model.post_quant_conv.weight": "vae/post_quant_conv.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight":
        "text_encoder/text_model.final_layer_norm.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight":     # pre-2022 transformers
        "text_encoder/text_model.embeddings.token_embedding.weight",
}


def test_sd15_ldm_names_by_hand():
  modules = pipeline.build_modules(configs.SD15_CONFIGS)
  parts = ldm.split_checkpoint({k: np.zeros(1) for k in SD15_LDM_KEYS}, modules["unet"],
                               modules["vae"])
  got = {f"{part}/{k}" for part, sd in parts.items() for k in sd}
  assert got == set(SD15_LDM_KEYS.values())
  # Every full-size diffusers name has an LDM name (686 U-Net, 248 VAE tensors).
  for name, count in (("unet", 686), ("vae", 248)):
    keys = [names.torch_key(tuple(p.key for p in path)) for path, _ in
            jax.tree_util.tree_flatten_with_path(names.param_shapes(modules[name]))[0]]
    sd = {k: np.zeros((1, 1)) for k in keys}
    inverse = ldm_checkpoint({"unet": {}, "vae": {}, "text_encoder": {}, name: sd},
                                modules["unet"], modules["vae"])
    assert len(keys) == len(inverse) == count
    assert set(ldm.split_checkpoint(inverse, modules["unet"], modules["vae"])[name]) == set(keys)


def _ldm_state_dict(models, folder):
  """The tiny models as one LDM-named state dict (inverse map), with schedule entries."""
  parts = {name: {k: v.numpy() for k, v in m.state_dict().items()} for name, m in models.items()}
  modules = pipeline.build_modules(pipeline.read_configs(folder))
  sd = ldm_checkpoint(parts, modules["unet"], modules["vae"])
  sd["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
  sd["model_ema.num_updates"] = np.array(3)
  return sd


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_loads_the_same_variables(tmp_path, tiny_models, tiny_folder, reference_pipe, fmt):
  sd = _ldm_state_dict(tiny_models, tiny_folder)
  assert any(k.startswith("first_stage_model.encoder.mid.attn_1.q.") for k in sd)
  path = tmp_path / f"tiny.{fmt}"
  if fmt == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(sd, str(path))
  else:
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                "global_step": 470000}, path)
  pipe = pipeline.load_pipeline(path, config_dir=tiny_folder)
  _assert_same_variables(pipe.variables, reference_pipe.variables)
  assert pipe.tokenizer is not None


def test_single_file_ema_and_unknown_keys(tmp_path, tiny_models, tiny_folder):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd = _ldm_state_dict(tiny_models, tiny_folder)
  ema = {ldm._ema_key(k[len(ldm.UNET_PREFIX):]): np.full_like(v, 0.5)  # pylint: disable=protected-access
         for k, v in sd.items() if k.startswith(ldm.UNET_PREFIX)}
  save_file({**sd, **ema}, str(tmp_path / "ema.safetensors"))
  pipe = pipeline.load_pipeline(tmp_path / "ema.safetensors", config_dir=tiny_folder, ema=True)
  assert all((leaf == 0.5).all() for leaf in jax.tree.leaves(pipe.variables["unet"]))
  save_file({**sd, "something.else": np.zeros(1)}, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError, match=r"outside the U-Net, VAE and text encoder: "
                                            r"\['something.else'\]"):
    pipeline.load_pipeline(tmp_path / "bad.safetensors", config_dir=tiny_folder)


def test_builtin_configs_reject_tiny_checkpoint(tmp_path, tiny_models, tiny_folder):
  """Without config_dir the SD 1.5 configs apply: a tiny file fails with named keys."""
  require_fixtures()
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(_ldm_state_dict(tiny_models, tiny_folder), str(tmp_path / "tiny.safetensors"))
  with pytest.raises(ConversionError, match=r"matches no module|do not match its config.json"):
    pipeline.load_pipeline(tmp_path / "tiny.safetensors", tokenizer_dir=FIXTURES / "tokenizer")
