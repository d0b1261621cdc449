"""frozen_dtype: the frozen teacher stored in bfloat16 (`train.teacher.frozen_variables`).

Parity: a tiny EDM teacher (the fixtures' SongUNet architecture, random weights) run
from bfloat16-stored variables against the same weights in float32, at both compute
dtypes. Under compute_dtype=bfloat16 every convolution and linear layer already casts
its weights to bfloat16, so only the float32-computed parameters (group-norm scales
and biases, the noise embedding) round: the denoised outputs agree to 2e-2 of their
scale. Under float32 compute each weight carries one bfloat16 rounding (relative
2^-9): 3e-2 of the output's scale.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill_jax import config_lib
from fdistill_jax.loaders.edm_variables import random_variables
from fdistill_jax.models.edm import build_edm
from fdistill_jax.train import teacher as base

ARCH = dict(model_type="SongUNet", img_resolution=8, img_channels=3, label_dim=0,
            model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def _config(name):
  return ml_collections.ConfigDict({"frozen_dtype": name})


def test_frozen_variables_casts_floating_leaves_only():
  tree = {"params": {"w": np.ones((2, 3), np.float32)}, "count": np.arange(3)}
  out = base.frozen_variables(tree, _config("bfloat16"))
  assert out["params"]["w"].dtype == jnp.bfloat16 and out["count"].dtype == tree["count"].dtype
  assert tree["params"]["w"].dtype == np.float32          # the trainable copy is untouched
  same = base.frozen_variables(tree, _config("float32"))
  assert same["params"]["w"].dtype == np.float32
  with pytest.raises(ValueError, match="frozen_dtype='float16'"):
    base.frozen_variables(tree, _config("float16"))


def test_config_rejects_an_unknown_frozen_dtype():
  c = config_lib.base_config()
  c.frozen_dtype = "int8"
  with pytest.raises(ValueError, match="frozen_dtype"):
    config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("compute,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 3e-2)],
                         ids=["bf16", "f32"])
def test_bfloat16_teacher_matches_float32(compute, tol):
  module = build_edm(ARCH, dtype=compute)
  variables = random_variables(module, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  sigma = jnp.asarray([0.5, 5.0])
  apply = jax.jit(module.apply)
  want = np.asarray(apply(variables, x, sigma), np.float32)
  got = np.asarray(apply(base.frozen_variables(variables, _config("bfloat16")), x, sigma),
                   np.float32)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < tol * scale
