"""EDM `state_dict()` -> Flax variables, and parameter counting (no allocation).

Names map one to one: EDM's `model.enc.16x16_block0.conv0.weight` is Flax's
`params/model/enc/16x16_block0/conv0/weight`. Layouts change: convolution
weights OIHW -> HWIO and linear weights [out, in] -> [in, out]. EDM's
`resample_filter` buffers are constants of the Flax modules: they are checked
against the architecture's filter and dropped. FourierEmbedding's `freqs`
buffer goes to the non-trainable 'buffers' collection.
"""

from typing import Any, Mapping, Optional, Union

from clu import parameter_overview
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.loaders import variables
from fdistill_jax.models.edm import build_edm
from fdistill_jax.models.layers import resample_kernel

_MAX_REPORTED = 10
MAX_PARAMS = 4_000_000_000    # the most an architecture from a file may declare (EDM2-XXL: 1.5e9)


def _dummy_inputs(module):
  """Input shapes for tracing (ShapeDtypeStructs: nothing is allocated)."""
  r, c = module.img_resolution, module.img_channels
  x = jax.ShapeDtypeStruct((1, r, r, c), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, module.label_dim), jnp.float32) if module.label_dim else None
  return x, jax.ShapeDtypeStruct((1,), jnp.float32), labels


def variable_shapes(module_or_arch: Union[nn.Module, Mapping[str, Any]]):
  """Variables of `module.init` as ShapeDtypeStructs, via jax.eval_shape (no allocation)."""
  module = module_or_arch if isinstance(module_or_arch, nn.Module) else build_edm(module_or_arch)
  return variables.variable_shapes(module, *_dummy_inputs(module))


def declared_param_count(arch: Mapping[str, Any], present: Optional[int] = None) -> int:
  """Parameters (all collections) `arch` declares, checked before any array is made.

  The arch's types and ranges are checked first (`build_edm`), then its shapes
  are traced without allocating. Refuses more than `MAX_PARAMS`, and, when
  `present` (the number of weights a file holds) is given, any other count.
  """
  try:
    shapes = variable_shapes(arch)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a malformed arch fails in tracing)
    raise ValueError(f"the architecture cannot be built ({type(e).__name__}: {e}).") from None
  count = variables.count_params(shapes)
  if count > MAX_PARAMS:
    raise ValueError(f"the architecture declares {count:,} parameters, more than the "
                     f"{MAX_PARAMS:,} this loader accepts.")
  if present is not None and count != present:
    raise ValueError(f"the architecture declares {count:,} weights but the file holds "
                     f"{present:,}: they do not belong together.")
  return count


def count_params(module_or_arch: Union[nn.Module, Mapping[str, Any]]) -> int:
  """Number of trainable parameters (the 'params' collection; EDM counts no buffers)."""
  return int(parameter_overview.count_parameters(variable_shapes(module_or_arch)["params"]))


def _flat_expected(shapes):
  """{edm dotted name: ((collection,) + flax path tuple, shape)} for every variable."""
  return {".".join(keys): ((collection,) + keys, tuple(leaf.shape))
          for collection, tree in shapes.items()
          for keys, leaf in variables.flatten(tree).items()}


def _check_resample_filter(name, value, arch):
  filt = resample_kernel(arch.get("resample_filter", (1, 1)))
  if value.shape[-2:] != filt.shape or not np.allclose(value.reshape(filt.shape), filt, atol=1e-6):
    return (f"{name}: buffer {value.reshape(value.shape[-2:]).tolist()} differs from the "
            f"arch's resample_filter {arch.get('resample_filter', [1, 1])} -> {filt.tolist()}")
  return None


def _mismatch_error(missing, unexpected, wrong):
  return ValueError(
      "EDM state dict does not match the architecture: " +
      variables.mismatch_report(missing, unexpected, wrong, _MAX_REPORTED) +
      ". Check that `arch` holds the snapshot's own EDMPrecond arguments "
      "(model_type, model_channels, channel_mult, num_blocks, attn_resolutions, ...).")


def variables_from_state_dict(arch: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                              dtype=jnp.float32):
  """Converts an EDM `EDMPrecond.state_dict()` into Flax variables for `build_edm(arch)`.

  Args:
    arch: EDMPrecond constructor arguments (as for `build_edm`).
    state_dict: EDM names -> arrays in PyTorch layout (numpy or anything
      `np.asarray` accepts).
    dtype: dtype of the returned parameter arrays.

  Returns:
    `{'params': ...}` (plus `{'buffers': ...}` for Fourier embeddings), jax arrays.

  Raises:
    ValueError: listing the first missing, unexpected and wrongly shaped
      entries (both shapes, in Flax layout), or a resample filter mismatch.
  """
  expected = _flat_expected(variable_shapes(arch))
  filters = [_check_resample_filter(k, np.asarray(v), arch) for k, v in state_dict.items()
             if k.endswith(".resample_filter")]
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".resample_filter")}
  out, missing, unexpected, wrong = variables.match(
      expected, state_dict, lambda _, v: variables.to_flax_layout(np.asarray(v)))
  wrong = [p for p in filters if p] + wrong
  if missing or unexpected or wrong:
    raise _mismatch_error(missing, unexpected, wrong)
  return variables.unflatten({k: jnp.asarray(v, dtype) for k, v in out.items()})


def _edm_scale(names) -> bool:
  """EDM's normalisation scales: a `weight` under a `.norm*` module (`norm0`, `norm1`, ...)."""
  dotted = ".".join(names)
  return ".norm" in dotted and dotted.endswith("weight")


def random_variables(module_or_arch, seed=0):
  """Random variables for an EDM network (`variables.random_params`, the one initialiser).

  For tests, benchmarks and smoke runs (teacher.kind='random'). The scales drawn
  around 1 are those of `norm0`/`norm1`/`norm2` (`_edm_scale`), as they always were,
  so random teachers of earlier runs are the same arrays.
  """
  return variables.random_params(variable_shapes(module_or_arch), seed, _edm_scale)
