"""Console progress lines: durations, ETA from the measured rate, compilation excluded."""

import logging
import sys

import pytest

from fdistill_jax import console


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (5, "5s"), (59.4, "59s"), (59.6, "1m00s"),
                                           (125, "2m05s"), (3599, "59m59s"), (7300, "2h01m"),
                                           (-3, "0s")])
def test_format_duration(seconds, text):
  assert console.format_duration(seconds) == text


class Clock:
  def __init__(self, monkeypatch, start=1000.0):
    self.now = start
    monkeypatch.setattr(console.time, "time", lambda: self.now)


def _lines(caplog):
  return [r.getMessage() for r in caplog.records if r.name == console.PROGRESS_LOGGER]


def test_counter_rate_excludes_the_first_batch(monkeypatch, caplog):
  """The first batch compiles for 100 s; then 10 items per 10 s. Rate 1.0/s and ETA
  (100 - 20) / 1.0 = 80 s, not the 20 / 110 s average."""
  caplog.set_level(logging.INFO, logger=console.PROGRESS_LOGGER)
  clock = Clock(monkeypatch)
  counter = console.Counter("features", 100, every_secs=10)
  clock.now += 100
  counter(10)                            # first call: due (110 s since start), no rate yet
  clock.now += 10
  counter(20)
  lines = _lines(caplog)
  assert lines[-1] == "features: 20 / 100 (1.0/s, ETA 1m20s)", lines


def test_progress_on_a_short_run_shows_seconds(monkeypatch, caplog):
  """A 30-iteration run at 3 it/s after compilation: 'ETA 6s', never 'ETA 0m'."""
  caplog.set_level(logging.INFO, logger=console.PROGRESS_LOGGER)
  clock = Clock(monkeypatch)
  progress = console.Progress(total=30, start=0, every_secs=1)
  clock.now += 20                        # the first iteration compiles
  progress(1)
  for step in range(2, 31):
    clock.now += 1 / 3
    progress(step)
  lines = _lines(caplog)
  assert lines[0].startswith("step 1/30 (3%) | compiled | ETA ?"), lines
  assert any("| ETA 6s" in line or "| ETA 7s" in line for line in lines), lines
  assert lines[-1].startswith("step 30/30 (100%) | 3.00 it/s | ETA 0s"), lines
  assert not any("0m" in line for line in lines), lines


def test_progress_lines_follow_the_current_stdout(monkeypatch):
  """say() writes to the sys.stdout of the moment it is called, not the one the handler
  was made with (a closed capture of an earlier test, a finished redirect); progress_on
  overrides it inside its block only."""
  import io  # pylint: disable=g-import-not-at-top
  first = io.StringIO()
  monkeypatch.setattr(sys, "stdout", first)
  console.say("one")
  first.close()                                 # the stream the handler first saw
  second, other = io.StringIO(), io.StringIO()
  monkeypatch.setattr(sys, "stdout", second)
  console.say("two")
  with console.progress_on(other):
    console.say("three")
  console.say("four")
  assert second.getvalue().split() == ["two", "four"]
  assert other.getvalue().split() == ["three"]


def test_progress_shows_the_latest_generator_values_on_critic_only_iterations(
    monkeypatch, caplog):
  """The generator steps on even iterations only; a line on an odd (critic-only) one still
  shows gen/loss (its latest value) next to the critic's; the speed goes to the writer."""
  caplog.set_level(logging.INFO, logger=console.PROGRESS_LOGGER)
  clock = Clock(monkeypatch)

  class Writer:
    def __init__(self):
      self.scalars = []

    def write_scalars(self, step, scalars):
      self.scalars.append((step, scalars))

  writer = Writer()
  progress = console.Progress(total=5, start=0, every_secs=1, writer=writer)
  for step in range(1, 6):
    clock.now += 2
    metrics = {"fake/loss": step / 10, "disc/loss": 1.0}
    if step % 2 == 0:
      metrics["gen/loss"] = step / 100
    progress(step, metrics)
  lines = _lines(caplog)
  assert lines[-1].endswith("| gen/loss 0.04 fake/loss 0.5 disc/loss 1"), lines
  assert lines[2].endswith("| gen/loss 0.02 fake/loss 0.3 disc/loss 1"), lines
  assert writer.scalars[-1] == (5, {"steps_per_sec": 0.5}), writer.scalars
