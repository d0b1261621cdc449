"""diffusers / transformers state-dict names <-> Flax variables, and parameter shapes.

The Flax modules of `fdistill_jax.models.sd` keep the reference's module
names; a list index is joined to its list's name with an underscore, because
Flax module names cannot be bare integers:

  down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight
  -> ('down_blocks_1', 'attentions_0', 'transformer_blocks_0', 'ff', 'net_0', 'proj', 'weight')

Layouts: convolution weights OIHW -> HWIO, linear weights [out, in] ->
[in, out]; embedding tables (`*embedding.weight` of rank 2) and vectors are
unchanged. Conversion is checked: every expected variable present with its
shape, nothing unexpected, or a `ConversionError` naming the keys.
"""

import re
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.loaders import variables
from fdistill_jax.loaders.errors import ConversionError
from fdistill_jax.models import sd as sd_nets

# The reference's list attributes (nn.ModuleList / nn.Sequential) whose items are indexed.
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                        "upsamplers", "transformer_blocks", "to_out", "net", "layers"})
# Buffers that some writers save and that are not parameters: checked, then dropped.
POSITION_ID_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# diffusers < 0.14 names of the VAE mid-block attention (diffusers still renames them on load).
_DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                             "proj_attn": "to_out.0"}
_MAX_REPORTED = 8


def flax_path(key: str) -> tuple:
  """'a.resnets.0.conv1.weight' -> ('a', 'resnets_0', 'conv1', 'weight')."""
  out = []
  for part in key.split("."):
    if part.isdigit():
      if not out or out[-1] not in LIST_NAMES:
        raise ConversionError(f"state-dict key {key!r} has an index after "
                              f"{out[-1] if out else 'nothing'!r}, which is not a known list.")
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def torch_key(path) -> str:
  """Inverse of `flax_path`."""
  parts = []
  for name in path:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    parts.append(f"{m[1]}.{m[2]}" if m and m[1] in LIST_NAMES else name)
  return ".".join(parts)


def _is_embedding(key: str) -> bool:
  parts = key.split(".")
  return len(parts) >= 2 and parts[-2].endswith("embedding")


def to_flax_layout(key: str, value: np.ndarray) -> np.ndarray:
  """`variables.to_flax_layout`; embedding tables keep their [vocab, dim] layout."""
  return variables.to_flax_layout(value, transpose_2d=not _is_embedding(key))


def dummy_inputs(module: nn.Module) -> tuple:
  """The smallest inputs that run `module` (parameter shapes do not depend on them)."""
  if isinstance(module, sd_nets.UNet2DConditionModel):
    r = 2 ** (len(module.block_out_channels) - 1)
    return (jnp.zeros((1, r, r, module.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, module.cross_attention_dim)))
  if isinstance(module, sd_nets.AutoencoderKL):
    r = 2 ** (len(module.block_out_channels) - 1)
    return (jnp.zeros((1, r, r, module.in_channels)),)
  if isinstance(module, (sd_nets.CLIPTextModel, sd_nets.CLIPTextModelWithProjection)):
    return (jnp.zeros((1, 1), jnp.int32),)
  if isinstance(module, sd_nets.CLIPVisionModelWithProjection):
    v = module.vision_model
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels)),)
  raise TypeError(f"no dummy inputs for {type(module).__name__}.")


def dummy_keyword_inputs(module: nn.Module) -> dict:
  """Keyword inputs `module` needs besides `dummy_inputs`: SDXL's pooled text and time_ids."""
  if isinstance(module, sd_nets.UNet2DConditionModel) and module.addition_embed_type:
    # Parameter shapes depend on the total width only; one time id leaves the rest to the text.
    pooled = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
    return {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 1))}
  return {}


def param_shapes(module: nn.Module):
  """The 'params' tree of `module` as ShapeDtypeStructs (jax.eval_shape: nothing allocated)."""
  return variables.variable_shapes(module, *dummy_inputs(module),
                                   **dummy_keyword_inputs(module))["params"]


def _flat_shapes(tree) -> dict:
  """{torch key: (flax path, shape)} for every leaf of a params tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(p.key for p in path)
    out[torch_key(keys)] = (keys, tuple(leaf.shape))
  return out


def _normalise_keys(state_dict: Mapping[str, np.ndarray], what: str) -> dict:
  """Drops position_ids buffers (after checking them) and renames deprecated VAE keys."""
  out = {}
  for key, value in state_dict.items():
    if key in POSITION_ID_KEYS:
      value = np.asarray(value)
      if not np.array_equal(value.reshape(-1), np.arange(value.size)):
        raise ConversionError(f"{what}: {key} is not 0, 1, 2, ...; custom position ids are "
                              "not supported.")
      continue
    m = re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)(\..*)", key)
    if m:
      key = m[1] + _DEPRECATED_VAE_ATTENTION[m[2]] + m[3]
    out[key] = value
  return out


def _add_missing_root(state_dict: dict, expected: Mapping[str, tuple]) -> dict:
  """Adds the single top-level module name (e.g. `text_model.`) when the file lacks it.

  transformers 5 saves `CLIPTextModel` without its `text_model.` level (and
  strips it on load); SD 1.5's files and diffusers keep it.
  """
  roots = {k.split(".", 1)[0] for k in expected}
  if len(roots) != 1:
    return state_dict
  root = roots.pop()
  if any(k.split(".", 1)[0] == root for k in state_dict):
    return state_dict
  return {f"{root}.{k}": v for k, v in state_dict.items()}


def _mismatch(what, missing, unexpected, wrong) -> ConversionError:
  return ConversionError(f"{what} weights do not match its config.json: " +
                         variables.mismatch_report(missing, unexpected, wrong, _MAX_REPORTED) +
                         ". Check that the weights and the config belong to the same model.")


def _as_float(key, value, what):
  value = np.asarray(value)
  if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
    raise ConversionError(f"{what}: {key} has dtype {value.dtype}; parameters must be floats.")
  return value.astype(np.float32)


def variables_from_state_dict(module: nn.Module, state_dict: Mapping[str, np.ndarray],
                              what: str = "model", shapes: Optional[dict] = None) -> dict:
  """`{'params': ...}` for `module` from a PyTorch state dict (names as the reference).

  Raises:
    ConversionError: listing missing, unexpected and wrongly shaped keys (both
      shapes in Flax layout), or a non-float parameter.
  """
  expected = _flat_shapes(shapes if shapes is not None else param_shapes(module))
  state_dict = _normalise_keys(_add_missing_root(dict(state_dict), expected), what)
  flat, missing, unexpected, wrong = variables.match(
      expected, state_dict, lambda key, value: to_flax_layout(key, _as_float(key, value, what)))
  if missing or unexpected or wrong:
    raise _mismatch(what, missing, unexpected, wrong)
  return {"params": variables.unflatten({p: jnp.asarray(v) for p, v in flat.items()})}


def random_variables(module: nn.Module, seed: int = 0) -> dict:
  """Random `{'params': ...}` of `module` (`variables.random_params`, the one initialiser)."""
  return {"params": variables.random_params(param_shapes(module), seed)}
