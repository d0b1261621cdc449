"""benchmarks.device_report --tiny: the prepared device run works end to end on a CPU, at
tiny sizes, and says what it skipped and why (so the full-size command cannot rot)."""

import json

import pytest

from benchmarks import device_report


@pytest.mark.slow
def test_tiny_report_runs_and_explains_what_it_skipped(tmp_path):
  report = device_report.main(["--tiny", f"--out={tmp_path}", "--configs=tiny",
                               "--dtypes=bfloat16", "--cycles=1", "--iters=1",
                               "--budget_s=1200"])
  saved = json.loads((tmp_path / "device_report.json").read_text())
  assert saved["backend"] == report["backend"] == "cpu"
  ran = [r for r in saved["training"] if "gen_images_per_s" in r]
  assert len(ran) == 1 and ran[0]["attention"] == "xla" and ran[0]["gen_images_per_s"] > 0, \
      saved["training"]
  assert ran[0]["compile_s"]["gen"] > 0 and ran[0]["peak_gib"] > 0
  skipped = [r for r in saved["training"] if "skipped" in r]
  assert skipped and "GPU" in skipped[0]["skipped"]             # auto = xla on a CPU, said why
  assert saved["sd15_latency"][0]["latency_ms"] > 0
  assert all("skipped" in r for r in saved["torch"])
  table = (tmp_path / "device_report.md").read_text()
  assert "| training |" in table and "| one-step SD 1.5 |" in table and "skipped:" in table
