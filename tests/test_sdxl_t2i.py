"""SDXL as a teacher of the engine: configs/sdxl.py, its tiny run through `main`, and the
pytree conditioning (context, pooled text, time_ids) with its CFG negative."""

import dataclasses
import functools
import json
import os
import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import sdxl as sdxl_config
from fdistill_jax import config_lib
from fdistill_jax import main as main_lib
from fdistill_jax import plugins
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.problems.t2i import distill
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import warm_start
from tests import t2i_helpers
from tests.t2i_helpers import REPO, TOKENIZER

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


tiny_config = functools.partial(t2i_helpers.tiny_config, config_module=sdxl_config)


def test_sdxl_config_is_table5s_column():
  c = sdxl_config.get_config("js")
  assert (c.batch_size, c.fake_score_update_freq, c.total_steps) == (384, 5, 25_000)
  assert (c.loss.gan_weight, c.loss.cfg_weight) == (5e-3, 8.0)
  assert (c.optim.gen_lr, c.optim.fake_lr, c.optim.disc_lr) == (5e-7, 5e-7, 5e-7)
  assert tuple(c.disc.resolutions) == (sdxl_config.MID,) and c.data.resolution == 1024
  assert c.teacher.kind == "sdxl"
  assert (c.loss.clock, c.loss.fake_score_weighting, tuple(c.ema_decays), c.loss.r1_gamma) == (
      "ddpm", "eps", (), 0.0)
  assert len(c.eval.grid_prompts) == 8 and c.eval.grid_prompts[0].startswith(
      "There is a long river in the middle of a spectacular valley")      # the paper's Fig. 1
  for d in config_lib.DIVERGENCES:
    assert sdxl_config.get_config(d).divergence == d
  assert sdxl_config.get_config("rkl,no_gan").loss.gan_weight == 0
  config_lib.validate(c, num_devices=8)


def test_conditioning_is_a_pytree_with_a_zero_negative(shards):
  """host tokenises with both tokenizers; draw gives {'context', 'pooled', 'time_ids'} with the
  batch leading; the CFG negative zeros context and pooled and keeps time_ids."""
  c = ml_collections.FrozenConfigDict(tiny_config(**{"data.path": shards}))
  teacher = REGISTRY.teacher(c)
  cond = teacher.conditioning
  batch = cond.host({"captions": ["a photo of a cat", "a dog"]})
  assert batch["tokens"].shape == batch["tokens_2"].shape == (2, 77)
  tv = teacher.variables
  drawn = jax.jit(lambda v, b: cond.draw(v, None, None, b))(tv, batch)
  assert {k: v.shape for k, v in drawn.items()} == {
      "context": (2, 77, 32), "pooled": (2, 16), "time_ids": (2, 6)}
  np.testing.assert_array_equal(drawn["time_ids"], [[16, 16, 0, 0, 16, 16]] * 2)
  assert float(jnp.abs(drawn["context"][0] - drawn["context"][1]).max()) > 1e-3
  uncond = cond.uncond(tv, drawn)
  assert not np.any(uncond["context"]) and not np.any(uncond["pooled"])
  np.testing.assert_array_equal(uncond["time_ids"], drawn["time_ids"])
  assert jax.tree.structure(cond.dummy(3)) == jax.tree.structure(drawn)
  empty = ml_collections.FrozenConfigDict(tiny_config(**{"data.path": shards}))
  no_zeros = REGISTRY.teacher(empty).conditioning
  no_zeros = dataclasses.replace(  # the family's flag lives on the pipeline's module
      no_zeros, teacher=no_zeros.teacher.clone(force_zeros_for_empty_prompt=False))
  u = no_zeros.uncond(tv, drawn)
  e = no_zeros.draw(tv, None, None, no_zeros.host({"captions": [""]}))
  np.testing.assert_allclose(u["context"][1], e["context"][0], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_sdxl_tiny_run_through_main(shards, tmp_path):
  """configs/sdxl.py:js,tiny for 2 iterations through `main` on 8 devices (CFG 8 on the pytree
  conditioning, GAN on the mid-block features): generator and fake score move from the
  teacher U-Net and stay finite; the generator spec is an 'sdxl' one."""
  workdir = tmp_path / "run"
  argv = ["main", f"--config={REPO}/configs/sdxl.py:js,tiny", f"--workdir={workdir}",
          f"--config.teacher.tokenizer={TOKENIZER}", f"--config.teacher.tokenizer_2={TOKENIZER}",
          f"--config.data.path={shards}"]
  with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    main_lib.main(["main"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  spec = json.load(open(workdir / ckpt_lib.GENERATOR_SPEC))
  assert spec["kind"] == "sdxl" and spec["sample_shape"] == [8, 8, 4]
  module, shape, _ = REGISTRY.student_from_spec(spec)
  assert shape == (8, 8, 4) and module.unet.addition_embed_type == "text_time"
  parts, step = warm_start.restore_parts(str(workdir))
  assert step == 2
  start = jax.tree.leaves(REGISTRY.teacher(tiny_config()).student_params)
  for name in ("gen", "fake"):
    now = jax.tree.leaves(parts[name])
    assert len(start) == len(now)
    assert any(not np.allclose(a, b) for a, b in zip(start, now)), name
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(parts))
  # The 't2i_grid' evaluator ran at the last step (teacher: guided DDIM on the pytree
  # conditioning with the zero negative; student: one call; sd.run_sampling).
  assert os.path.isfile(workdir / ckpt_lib.SAMPLES / "t2i_step_0000002.png")
  # tools.sample's loader (the sampling itself is the grid's code path): an 'sdxl' run.
  assert run_sampling.is_t2i_run(str(workdir))
  run = run_sampling.load_run(str(workdir), registry=REGISTRY)
  assert isinstance(run.conditioning, distill.TextConditioning) and run.conditioning.is_sdxl
  assert set(run.tokenize(["a red car"])) == {"tokens", "tokens_2"}
  assert run.info["step"] == 2 and jax.tree.structure(run.generator_params) == \
      jax.tree.structure(parts["gen"])
