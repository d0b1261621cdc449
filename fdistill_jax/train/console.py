"""What a person sees: one progress line at a time on the console, everything in log.txt.

`quiet_console()` keeps the console to warnings and errors (JAX backend probes,
orbax's and clu's INFO chatter go to the log file only); `log_to_file(path)`
sends every INFO record to the run's log file; `Progress` prints
'step 300/1500 (20%) | 12.3 it/s | ETA 1m37s | gen/loss 0.123 ...' lines to
stdout on process 0 (at most one every `every_secs`) and into the log file.
"""

import contextlib
import logging
import sys
import time

import jax

from fdistill_jax.eval.sampling import format_duration

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_LOGGER = "fdistill_jax.progress"


def quiet_console():
  """Console handlers show warnings and errors only; the root logger keeps INFO for files."""
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    if not isinstance(handler, logging.FileHandler):
      handler.setLevel(logging.WARNING)
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


@contextlib.contextmanager
def log_to_file(path):
  """Adds a handler writing INFO and above to `path` (appending) for the block's duration."""
  root = logging.getLogger()
  previous = root.level
  root.setLevel(min(previous, logging.INFO) if previous else logging.INFO)
  handler = logging.FileHandler(path, mode="a", encoding="utf-8")
  handler.setLevel(logging.INFO)
  handler.setFormatter(logging.Formatter(_FORMAT))
  root.addHandler(handler)
  try:
    yield handler
  finally:
    root.removeHandler(handler)
    handler.close()
    root.setLevel(previous)


def _progress_logger():
  logger = logging.getLogger(PROGRESS_LOGGER)
  if not any(getattr(h, "_fdistill_progress", False) for h in logger.handlers):
    handler = logging.StreamHandler(sys.stdout)
    handler._fdistill_progress = True  # pylint: disable=protected-access
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  return logger


def say(message, *args):
  """A line for the person running the job (stdout on process 0, and the log file)."""
  if jax.process_index() == 0:
    _progress_logger().info(message, *args)
  else:
    logging.getLogger(PROGRESS_LOGGER).info(message, *args)


class Progress:
  """Progress lines with rate, ETA and the main losses."""

  KEYS = ("gen/loss", "fake/loss", "disc/loss")

  def __init__(self, total, start, every_secs=10.0):
    self.total, self.every = total, every_secs
    self.start_step, self.start_time = start, time.time()
    self.last = 0.0

  def __call__(self, step, scalars_fn=None, force=False):
    """Prints a line if `every_secs` passed (or `force`); `scalars_fn()` gives the losses."""
    now = time.time()
    if not force and now - self.last < self.every and step < self.total:
      return
    self.last = now
    scalars = scalars_fn() if scalars_fn else None
    done = step - self.start_step
    rate = done / max(now - self.start_time, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    eta_text = format_duration(eta) if eta == eta else "?"
    losses = " ".join(f"{k} {scalars[k]:.4g}" for k in self.KEYS if scalars and k in scalars)
    say("step %d/%d (%d%%) | %.2f it/s | ETA %s%s", step, self.total,
        100 * step // self.total, rate, eta_text, f" | {losses}" if losses else "")
