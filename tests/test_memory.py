"""benchmarks.memory: the traced residual count against hand-counted buffers, and the
per-device estimate of the tiny config against independent parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import memory


def test_residual_bytes_counts_the_saved_activations_only():
  """sum(tanh(x @ w)): JAX's tanh rule saves its output and 1 - output^2, [B, H] each (x
  and w are inputs, not new buffers); under jax.checkpoint only the inputs are saved.
  (The same lists as `jax.ad_checkpoint.print_saved_residuals`, less the inputs.)"""
  w = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
  f = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  assert memory.residual_bytes(f, (w,), x) == 2 * 8 * 64 * 4
  assert memory.residual_bytes(jax.checkpoint(f), (w,), x) == 0
  # Two layers: both tanh pairs, and w.T (a new buffer the second matmul's backward reads).
  g = lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T))
  assert memory.residual_bytes(g, (w,), x) == (2 * 8 * 64 + 64 * 32 + 2 * 8 * 32) * 4


def test_tiny_estimate_matches_parameter_counts():
  """State = 2 trainable copies + heads, Adam's two moments each, the EMA copies; all
  float32. Residuals grow with the batch."""
  config, name = memory.configure("configs/tiny.py:js", devices=1)
  est = memory.estimate(config, name, [1, 2])
  teacher = memory.abstract_teacher(config, name)
  gen = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(teacher.student_params))
  f = est["fixed"]
  assert f["frozen"] == sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(teacher.variables))
  assert f["ema"] == len(config.ema_decays) * gen
  heads = f["trainable_params"] - 2 * gen
  assert heads > 0 and f["grads"]["gen"] == gen and f["grads"]["critic"] == gen + heads
  assert abs(f["optimizer_moments"] - 2 * f["trainable_params"]) < 1024   # + step counters
  r1, r2 = est["rows"]
  for step in ("gen", "critic"):
    assert r2["residuals"][step] > r1["residuals"][step] > 0
    grow = lambda r: r["residuals"][step] + r["attention_scores"]
    assert r1["per_example"][step] == grow(r2) - grow(r1)
  # The tiny teacher's one attention (4x4 pixels, one head): [16, 16] float32 logits and
  # float32 weights per example.
  assert r1["attention_scores"] == 16 * 16 * (4 + 4)


def test_bytes_are_divided_as_fsdp_shards():
  """The largest axis divisible by fsdp is split (train.runner.fsdp_axis); others replicate."""
  tree = {"a": jax.ShapeDtypeStruct((4, 6), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  assert memory._nbytes(tree) == 96 + 6  # pylint: disable=protected-access
  assert memory._nbytes(tree, fsdp=2) == 48 + 6  # pylint: disable=protected-access
