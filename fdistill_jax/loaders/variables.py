"""PyTorch state dicts <-> Flax variables: the helpers every name map shares.

The name maps themselves are rules of their model family
(`fdistill_jax.loaders.edm_variables` for EDM, `fdistill_jax.loaders.diffusers`
for diffusers / transformers); what they share lives here: the variables a
module declares (traced, nothing allocated), flattening and unflattening,
PyTorch -> Flax layouts, matching a state dict against the expected shapes
with a mismatch report, counting, and the one random-parameter initialiser.
"""

from typing import Callable, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

flatten = traverse_util.flatten_dict      # {'a': {'b': x}} -> {('a', 'b'): x}
unflatten = traverse_util.unflatten_dict  # its inverse


def variable_shapes(module, *inputs, **keyword_inputs):
  """`module.init`'s variables as ShapeDtypeStructs (jax.eval_shape: nothing is allocated);
  inputs may be arrays or ShapeDtypeStructs."""
  init = lambda a, k: module.init(jax.random.key(0), *a, **k)
  return jax.eval_shape(init, inputs, keyword_inputs)


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def to_flax_layout(value: np.ndarray, transpose_2d: bool = True) -> np.ndarray:
  """PyTorch -> Flax: convolutions OIHW -> HWIO, linear weights [out, in] -> [in, out]
  (`transpose_2d=False` for embedding tables, which keep [vocab, dim])."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2 and transpose_2d:
    return value.T
  return value


def match(expected: Mapping[str, tuple], state_dict: Mapping[str, np.ndarray],
          convert: Callable[[str, np.ndarray], np.ndarray]) -> tuple:
  """Matches a state dict against `expected` {name: (path, shape)}.

  Returns:
    ({path: converted value}, missing names, unexpected names with shapes, wrong-shape
    descriptions); `convert(name, value)` gives the value in Flax layout.
  """
  missing = [k for k in expected if k not in state_dict]
  unexpected = [f"{k} {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in expected]
  wrong, flat = [], {}
  for name, (path, shape) in expected.items():
    if name not in state_dict:
      continue
    value = convert(name, state_dict[name])
    if value.shape != tuple(shape):
      wrong.append(f"{name}: got {value.shape} (Flax layout), expected {tuple(shape)}")
      continue
    flat[path] = value
  return flat, missing, unexpected, wrong


def mismatch_report(missing, unexpected, wrong, limit: int = 8) -> str:
  """'2 missing: a, b; 1 unexpected: c (2,)' with at most `limit` names per kind."""
  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
      parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
  return "; ".join(parts)


def _key(entry) -> str:
  return str(getattr(entry, "key", entry))


def is_norm_scale(names: tuple) -> bool:
  """A 1-D `weight` of a normalisation layer (its module's name contains 'norm')."""
  return names[-1] == "weight" and len(names) >= 2 and "norm" in names[-2]


def random_params(shapes, seed: int = 0, is_scale: Callable[[tuple], bool] = is_norm_scale):
  """Random float32 arrays for a tree of shapes, drawn in numpy (no compiled init).

  The one initialiser of random teachers, benchmarks and tests: weights of rank >= 2
  ~ N(0, 1 / fan_in) (fan_in = product of all but the last axis), token and position
  embedding tables ~ N(0, 1), normalisation scales (`is_scale` of the path's names)
  ~ 1 + N(0, 0.05^2), other vectors (biases) ~ N(0, 0.05^2): no zero or degenerate
  layer. Leaves are drawn in tree order from one `np.random.default_rng(seed)`.
  Compiling `module.init` (its random number generation included) takes far longer
  on CPU than the network itself.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = tuple(_key(p) for p in path)
    if len(leaf.shape) >= 2 and len(names) >= 2 and names[-2].endswith(("token_embedding", "position_embedding")):
      return rng.normal(size=leaf.shape)
    if len(leaf.shape) >= 2:
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return (1.0 if is_scale(names) else 0.0) + rng.normal(0, 0.05, size=leaf.shape)

  return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(draw(p, l), jnp.float32),
                                          shapes)
