"""The embedded default: a short toy run improves on the initial generator.

The initial generator is the teacher's fitted MLP applied once at sigma_init:
it outputs (nearly) the data mean, so it covers one mode and its smoothed
KL(p||q) against the exact teacher is 7-11 nats (measured). A 400-step run
(200 generator updates) must cut KL(p||q) by at least a quarter, lower the
run's own f-divergence and the reverse KL, and find more modes.
"""

import json
import os

import pytest

from configs import toy2d
from fdistill_jax import config_lib
from fdistill_jax import plugins
from fdistill_jax.problems.toy import report
from fdistill_jax.train import loop

REGISTRY = plugins.default_registry()   # every problem (fdistill_jax.plugins)


def short_config(divergence):
  c = toy2d.get_config(divergence)
  c.total_steps, c.batch_size, c.fake_score_update_freq = 400, 256, 2
  c.ema_decays = (0.99,)        # per iteration: 0.999 would still hold 67% of the start at 400
  c.toy.update(width=64, depth=3, fit_steps=400)
  c.disc.resolutions = (0, 2)
  c.checkpoint_every, c.log_every = 0, 100
  return c


@pytest.mark.slow             # 400 iterations per divergence
@pytest.mark.parametrize("divergence", config_lib.DIVERGENCES)
def test_short_run_improves_the_divergence(divergence, tmp_path, monkeypatch):
  """Each divergence's one end-to-end run: the final checkpoint and the event file are
  written (as through `main`, tests/test_train.py), and the run improves on the start."""
  monkeypatch.setattr(report, "NUM_EVAL_SAMPLES", 1024)
  loop.train_and_evaluate(short_config(divergence), str(tmp_path), registry=REGISTRY)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["400"]       # the final checkpoint
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["divergence"] == divergence and metrics["steps"] == 400
  assert os.path.getsize(tmp_path / "toy.png") > 1000
  init, final = metrics["initial"], metrics["final"]
  assert init["forward_kl"] > 5.0 and init["modes_covered"] <= 2
  assert final["forward_kl"] < 0.75 * init["forward_kl"], (init["forward_kl"],
                                                           final["forward_kl"])
  assert final["reverse_kl"] < init["reverse_kl"]
  assert final["modes_covered"] > init["modes_covered"]
  assert final[f"f_div/{divergence}"] < init[f"f_div/{divergence}"]


def test_sweep_table_starts_with_the_exact_teachers_own_samples(tmp_path, monkeypatch):
  """The sweep's first row is the exact teacher's samples through the same measures
  (10/10 modes; off-mode 1 - P(within 3 std) = 1.1% in expectation, binomial sd 0.33%
  at 1024 samples, so < 2.5%); the runs follow; a second call reuses the runs."""
  from fdistill_jax.tools import sweep  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(report, "NUM_EVAL_SAMPLES", 1024)
  overrides = [("total_steps", 2), ("batch_size", 16), ("toy.width", 32), ("toy.depth", 2),
               ("toy.fit_steps", 20), ("disc.resolutions", (0, 1)), ("disc.channels", 16),
               ("checkpoint_every", 0)]
  config_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "toy2d.py")
  results, table, _ = sweep.sweep(config_path, str(tmp_path), ["js"], ["0"], overrides)
  assert list(results) == ["teacher (exact samples)", "js"]
  ref = results["teacher (exact samples)"][0]
  assert ref["modes_covered"] == 10 and ref["off_mode_fraction"] < 0.025
  rows = sweep.markdown_table(results, table, ["0"]).splitlines()
  assert rows[2].startswith("| teacher (exact samples) | 10.000 |") and rows[3].startswith("| js |")
  again, _, _ = sweep.sweep(config_path, str(tmp_path), ["js"], ["0"], overrides)
  assert again["js"] == results["js"]
