"""`pipelines.sharded.ShardedFn`: the one sharded batch function outside training, on the
eight simulated CPU devices (tests/conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fdistill_jax.pipelines import sharded


def _affine(w, x, y):
  return x @ w["a"] + y, (x * 2.0).sum(-1)


def test_sharded_fn_matches_numpy_and_shards_the_batch():
  rng = np.random.default_rng(0)
  w = {"a": rng.normal(size=(3, 5)).astype(np.float32)}
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.normal(size=(16, 5)).astype(np.float32)
  fn = sharded.ShardedFn(_affine, 2)
  assert fn.num_devices == jax.device_count() == 8
  out, total = fn(fn.replicate(w), x, y)
  # float32 matmul of 3 terms: round-off ~1e-6 relative; 1e-5 leaves room.
  np.testing.assert_allclose(np.asarray(out), x @ w["a"] + y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(total), (2 * x).sum(-1), rtol=1e-5, atol=1e-5)
  assert out.sharding.spec == P(sharded.DATA) and len(out.sharding.device_set) == 8


def test_sharded_fn_on_a_subset_of_devices_and_round_up():
  fn = sharded.ShardedFn(_affine, 2, jax.devices()[:2])
  assert fn.num_devices == 2
  assert [fn.round_up(b) for b in (0, 1, 2, 3, 64, 65)] == [2, 2, 2, 4, 64, 66]
  assert [sharded.round_up(b, 8) for b in (1, 8, 9, 256)] == [8, 8, 16, 256]
  with pytest.raises(ValueError, match="at least one device"):
    sharded.ShardedFn(_affine, 2, [])
