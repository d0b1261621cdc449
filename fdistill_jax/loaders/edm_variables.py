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
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  x, sigma, labels = _dummy_inputs(module)
  rngs = {"params": jax.random.key(0)}
  return jax.eval_shape(lambda x, s, l: module.init(rngs, x, s, l), x, sigma, labels)


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
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
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
  """{edm dotted name: (collection, flax path tuple, shape)} for every variable."""
  return {".".join(keys): (collection, keys, tuple(leaf.shape))
          for collection, tree in shapes.items()
          for keys, leaf in traverse_util.flatten_dict(tree).items()}


def _to_flax_layout(value):
  if value.ndim == 4:  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # [out, in] -> [in, out]
    return value.T
  return value


def _check_resample_filter(name, value, arch):
  filt = resample_kernel(arch.get("resample_filter", (1, 1)))
  if value.shape[-2:] != filt.shape or not np.allclose(value.reshape(filt.shape), filt, atol=1e-6):
    return (f"{name}: buffer {value.reshape(value.shape[-2:]).tolist()} differs from the "
            f"arch's resample_filter {arch.get('resample_filter', [1, 1])} -> {filt.tolist()}")
  return None


def _mismatch_error(missing, unexpected, wrong):
  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      shown = ", ".join(items[:_MAX_REPORTED])
      more = f" (+{len(items) - _MAX_REPORTED} more)" if len(items) > _MAX_REPORTED else ""
      parts.append(f"{len(items)} {title}: {shown}{more}")
  return ValueError(
      "EDM state dict does not match the architecture: " + "; ".join(parts) +
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
  missing = [k for k in expected if k not in state_dict]
  unexpected, wrong, out = [], [], {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name.endswith(".resample_filter"):
      problem = _check_resample_filter(name, value, arch)
      if problem:
        wrong.append(problem)
      continue
    if name not in expected:
      unexpected.append(f"{name} {tuple(value.shape)}")
      continue
    collection, path, shape = expected[name]
    value = _to_flax_layout(value)
    if value.shape != shape:
      wrong.append(f"{name}: got {value.shape} (Flax layout), expected {shape}")
      continue
    out[(collection,) + path] = value
  if missing or unexpected or wrong:
    raise _mismatch_error(missing, unexpected, wrong)
  return traverse_util.unflatten_dict({k: jnp.asarray(v, dtype) for k, v in out.items()})


def random_variables(module_or_arch, seed=0):
  """Random variables for an EDM network, drawn in numpy (no compiled init).

  Weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.05^2), norm scales ~ 1 + N(0, 0.05^2):
  no zero-initialised layers, like the EDM fixtures. For tests, benchmarks and
  smoke runs (teacher.kind='random'); compiling `module.init` (its random
  number generation included) takes far longer on CPU than the network itself.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = ".".join(p.key for p in path)
    if len(leaf.shape) >= 2:
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    base = 1.0 if ".norm" in name and name.endswith("weight") else 0.0
    return base + rng.normal(0, 0.05, size=leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda p, l: jnp.asarray(draw(p, l), jnp.float32), variable_shapes(module_or_arch))
