"""tools/sweep: runs keyed by their full resolved config, overrides, one teacher per seed.

Most tests replace the training run by a stub that records its config and writes
the files a toy run writes; one runs a real (tiny) sweep end to end.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from fdistill_jax import plugins
from fdistill_jax.io import atomic
from fdistill_jax.tools import cli
from fdistill_jax.tools import sweep
from fdistill_jax.problems.toy import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy2d.py")
SMALL = [("toy.width", 32), ("toy.depth", 2), ("toy.fit_steps", 20), ("toy.fit_batch", 64),
         ("batch_size", 16), ("disc.resolutions", (0, 1)), ("disc.channels", 16),
         ("total_steps", 4), ("fake_score_update_freq", 2), ("checkpoint_every", 0)]
REFERENCE = plugins.default_registry().tables["toy"].reference_name   # exact teacher, first


class Recorder:
  """Stands in for the teacher registry and the training run."""

  def __init__(self, monkeypatch):
    self.teachers, self.runs = [], []
    real = plugins.default_registry()
    fake = dataclasses.replace(real, teachers={**real.teachers, "toy": self.build})
    monkeypatch.setattr(sweep.plugins, "default_registry", lambda: fake)
    monkeypatch.setattr(sweep.loop, "train_and_evaluate", self.train)

  def build(self, config):
    self.teachers.append((config.seed, config.toy.fit_seed))
    return f"teacher{len(self.teachers)}"

  def train(self, config, workdir, registry, teacher=None):
    assert registry.teachers["toy"] == self.build
    self.runs.append((config, workdir, teacher))
    rng = np.random.default_rng(len(self.runs))
    final = {"modes_covered": 5 + len(self.runs), "num_modes": 10, "forward_kl": 0.5,
             "reverse_kl": 0.4, "off_mode_fraction": 0.1, "precision": 0.8, "recall": 0.7,
             "mode_mass": [0.1] * 10, "mode_weights": [0.1] * 10,
             "mode_mass_expected": [0.1] * 10}
    atomic.write_npz(os.path.join(workdir, report.SAMPLES_FILE),
                     final=rng.normal(size=(64, 2)), initial=rng.normal(size=(64, 2)) * 0.1)
    atomic.write_json(os.path.join(workdir, report.METRICS_FILE), {"final": final})


@pytest.mark.slow      # several toy runs
def test_runs_are_reused_only_with_the_same_config(tmp_path, monkeypatch):
  rec = Recorder(monkeypatch)
  variants, seeds = ["js", "fkl"], ["0", "1"]
  results, _, dirs = sweep.sweep(TOY, str(tmp_path), variants, seeds, [("total_steps", 7)])
  assert len(rec.runs) == 4 and list(results) == [REFERENCE, "js", "fkl"]
  assert len(results[REFERENCE]) == 2   # the exact teacher's samples, measured per seed
  for config, workdir, _ in rec.runs:                    # override and seeds applied
    assert config.total_steps == 7
    seed = int(os.path.basename(workdir).split("_")[0][len("seed"):])
    assert config.seed == config.data.seed == config.toy.fit_seed == seed
    recorded = json.load(open(os.path.join(workdir, sweep.RUN_CONFIG)))
    assert recorded["total_steps"] == 7 and recorded["divergence"] == config.divergence
  # One teacher per seed, shared by the variants of that seed.
  assert sorted(rec.teachers) == [(0, 0), (1, 1)]
  by_seed = {}
  for config, _, teacher in rec.runs:
    by_seed.setdefault(config.seed, set()).add(teacher)
  assert all(len(t) == 1 for t in by_seed.values()) and len(set.union(*by_seed.values())) == 2

  sweep.sweep(TOY, str(tmp_path), variants, seeds, [("total_steps", 7)])    # the same: reused
  assert len(rec.runs) == 4 and len(rec.teachers) == 2

  _, _, new_dirs = sweep.sweep(TOY, str(tmp_path), variants, seeds, [("total_steps", 8)])
  assert len(rec.runs) == 8 and all(c.total_steps == 8 for c, _, _ in rec.runs[4:])
  old = [d for runs in dirs.values() for d in runs]
  new = [d for runs in new_dirs.values() for d in runs]
  assert not set(old) & set(new) and all(os.path.isdir(d) for d in old)   # old results kept


def test_unknown_override_is_one_line_with_the_nearest_names(tmp_path, monkeypatch, capsys):
  Recorder(monkeypatch)
  code = cli.invoke(sweep.main, "sweep", sweep.FLAGS,
                    [f"--config={TOY}", f"--workdir={tmp_path}", "--seeds=0",
                     "--set=loss.gan_weigt=0.1"])
  err = capsys.readouterr().err
  assert code == 1 and err.startswith("sweep: error: ") and len(err.strip().splitlines()) == 1
  assert "loss.gan_weight" in err
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    sweep.parse_overrides(TOY, ["total_steps"])
  # Values are parsed by ml_collections by the field's type, as --config.FIELD=VALUE is.
  assert sweep.parse_overrides(TOY, ["disc.resolutions=(16, 8)", "data.mixture=ring10",
                                     "loss.gan_weight=1", "total_steps=30"]) == [
      ("data.mixture", "ring10"), ("disc.resolutions", (16, 8)), ("loss.gan_weight", 1.0),
      ("total_steps", 30)]
  with pytest.raises(ValueError, match="total_steps"):
    sweep.parse_overrides(TOY, ["total_steps=many"])


@pytest.mark.slow      # a toy sweep through the CLI
def test_cli_writes_table_json_and_figure(tmp_path, monkeypatch, caplog):
  Recorder(monkeypatch)
  caplog.set_level("INFO", logger="fdistill_jax.progress")
  code = cli.invoke(sweep.main, "sweep", sweep.FLAGS,
                    [f"--config={TOY}", f"--workdir={tmp_path}", "--variants=rkl,js,fkl",
                     "--seeds=0,1", "--set=total_steps=5"])
  assert code == 0
  for k in range(1, 7):
    assert f"run {k}/6: " in caplog.text
  table = (tmp_path / "table.md").read_text()
  assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")] == [
      "| variant", f"| {REFERENCE}", "| rkl", "| js", "| fkl"]
  data = json.loads((tmp_path / "sweep.json").read_text())
  assert set(data["results"]) == {REFERENCE, "rkl", "js", "fkl"}
  assert len(data["run_dirs"]["js"]) == 2
  assert os.path.getsize(tmp_path / sweep.FIGURE) > 10_000


def _github_cells(line):
  """The cells GitHub renders for one table line: split at '|' not escaped by a backslash."""
  return re.split(r"(?<!\\)\|", line.strip().strip("|"))


def test_tables_render_on_github_and_one_seed_shows_no_spread():
  """The toy's 'KL(p||q)' column and the digits table: every line has the header's cell
  count (unescaped pipes would add cells); one seed prints the value, several mean ± std."""
  from fdistill_jax.tools import digits_sweep  # pylint: disable=g-import-not-at-top
  toy = plugins.registry(["toy"]).tables["toy"]
  run = {"modes_covered": 9, "num_modes": 10, "forward_kl": 0.5, "reverse_kl": 0.4,
         "off_mode_fraction": 0.1, "precision": 0.8, "recall": 0.7, "mode_mass": [0.1] * 10,
         "mode_weights": [0.1] * 10, "mode_mass_expected": [0.1] * 10}
  digits_row = {"name": "js", "calls": 1, "fd": 3.0, "precision": 0.9, "recall": 0.8,
                "class_accuracy": 0.95, "seconds": 12.0}
  for seeds, text in ((["0"], sweep.markdown_table({"js": [run]}, toy, ["0"])),
                      (["0", "1"], sweep.markdown_table({"js": [run, run]}, toy, ["0", "1"])),
                      (["0"], digits_sweep.markdown_table({"js|x": [digits_row]}, ["0"]))):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(_github_cells(line)) for line in lines}) == 1, text
    assert ("±" in text) == (len(seeds) > 1), text
  assert "KL(p\\|\\|q)" in sweep.markdown_table({"js": [run]}, toy, ["0"])
  assert sweep.cell([0.5]) == "0.500" and sweep.cell([1.0, 3.0]) == "2.000 ± 1.000"


def test_a_real_tiny_sweep(tmp_path, monkeypatch):
  """Through the real engine (the test_train toy sizes, so compiles are shared): the run,
  its toy report and the sweep's figure."""
  monkeypatch.setattr(report, "NUM_EVAL_SAMPLES", 512)
  results, table, dirs = sweep.sweep(TOY, str(tmp_path), ["js"], ["0"], SMALL)
  assert list(results) == [REFERENCE, "js"]
  for variant, (run_dir,) in dirs.items():
    metrics = json.load(open(os.path.join(run_dir, report.METRICS_FILE)))
    assert metrics["divergence"] == variant and metrics["steps"] == 4
    assert os.path.exists(os.path.join(run_dir, report.SAMPLES_FILE))
  path = table.figure(str(tmp_path / "f.png"), {v: d[0] for v, d in dirs.items()},
                      json.load(open(os.path.join(dirs["js"][0], sweep.RUN_CONFIG))))
  assert os.path.getsize(path) > 10_000
