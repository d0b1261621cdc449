"""What a person sees: progress lines on the console, everything else in a log file.

`quiet_console()` keeps the console to warnings and errors (JAX backend probes,
orbax's and clu's INFO chatter go to the log file only); `log_to_file(path)`
sends every INFO record to a run's log file; `say` prints a line for the person
(stdout on process 0, and the log file); `Progress` prints training lines like
'step 300/1500 (20%) | 12.3 it/s | ETA 1m37s | gen/loss 0.123 ...' (and writes the speed,
`steps_per_sec`) and
`Counter` the progress of any other long loop (sampling, evaluation).
"""

import contextlib
import logging
import sys
import time

import jax

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_LOGGER = "fdistill_jax.progress"


class _NoLibraryTracebacks(logging.Filter):
  """Keeps the libraries' tracebacks (orbax logs one per failed write through absl) off the
  console: the log file still gets them, the console gets the tool's one-line error."""

  def filter(self, record):
    foreign = not record.name.startswith("fdistill_jax")
    return not (foreign and (record.exc_info or "Traceback (most recent call last)"
                             in str(record.msg)))


def quiet_console():
  """Console handlers show warnings and errors only, without library tracebacks; the root
  logger keeps INFO (and every traceback) for files."""
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
  for handler in root.handlers:
    if not isinstance(handler, logging.FileHandler):
      handler.setLevel(logging.WARNING)
      if not any(isinstance(f, _NoLibraryTracebacks) for f in handler.filters):
        handler.addFilter(_NoLibraryTracebacks())


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


class _ProgressHandler(logging.StreamHandler):
  """Progress lines to the current `sys.stdout`, looked up at every line (not the stdout of
  the moment the handler was made, which a test harness or a redirect may have closed since),
  or to the stream `progress_on` sets."""
  _fdistill_progress = True

  def __init__(self):
    self.override = None
    super().__init__(sys.stdout)

  @property
  def stream(self):
    return self.override if self.override is not None else sys.stdout

  @stream.setter
  def stream(self, value):   # StreamHandler.__init__ and setStream assign it
    self.override = None if value is sys.stdout else value


def _progress_logger():
  logger = logging.getLogger(PROGRESS_LOGGER)
  if not any(getattr(h, "_fdistill_progress", False) for h in logger.handlers):
    handler = _ProgressHandler()
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  return logger


@contextlib.contextmanager
def progress_on(stream):
  """Progress lines go to `stream` inside the block (stderr when stdout carries a result)."""
  handler = next(h for h in _progress_logger().handlers if getattr(h, "_fdistill_progress", False))
  previous, handler.override = handler.override, stream
  try:
    yield
  finally:
    handler.override = previous


def say(message, *args):
  """A line for the person running the job (stdout on process 0, and the log file)."""
  if jax.process_index() == 0:
    _progress_logger().info(message, *args)
  else:
    logging.getLogger(PROGRESS_LOGGER).info(message, *args)


def format_duration(seconds):
  """'42s', '3m05s', '2h07m'."""
  seconds = int(round(max(seconds, 0)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Counter:
  """'what: done / total (rate/s, ETA)' lines, at most one every `every_secs` seconds.

  The rate (and so the ETA) is measured from the first call on: the work
  before it (typically the first batch, which compiles) does not distort it.
  """

  def __init__(self, what, total, every_secs=10.0):
    self.what, self.total, self.every = what, total, every_secs
    self.start = self.last = time.time()
    self.first = None                  # (time, done) of the first call

  def __call__(self, done):
    now = time.time()
    if self.first is None:
      self.first = (now, done)
    finished_slowly = done >= self.total and now - self.start >= self.every
    if now - self.last < self.every and not finished_slowly:
      return
    self.last = now
    t0, done0 = self.first
    if done > done0 and now > t0:
      rate = (done - done0) / (now - t0)
    else:
      rate = done / max(now - self.start, 1e-9)
    say("%s: %d / %d (%.1f/s, ETA %s)", self.what, done, self.total, rate,
        format_duration((self.total - done) / max(rate, 1e-9)))


class Progress:
  """The training loop's one progress report: console lines with rate, ETA and the
  latest losses, and the speed (`steps_per_sec`) to a clu metric writer.

  The rate is measured from the first completed iteration on, so compilation
  does not distort the ETA. Each of `KEYS` shows its latest value, also on the
  iterations that did not compute it (the generator steps once every
  `fake_score_update_freq` iterations; the line may fall on a critic-only one).
  """

  KEYS = ("gen/loss", "fake/loss", "disc/loss")

  def __init__(self, total, start, every_secs=10.0, writer=None):
    self.total, self.every, self.writer = total, every_secs, writer
    self.start_step, self.start_time = None, None
    self.last_time, self.last_step = 0.0, start
    self.latest = {}                     # key -> its latest value (a device array: no sync)

  def __call__(self, step, metrics=None, force=False):
    """Records `metrics`' KEYS; prints a line if `every_secs` passed (or `force`)."""
    self.latest.update({k: v for k, v in (metrics or {}).items() if k in self.KEYS})
    now = time.time()
    if self.start_step is None:
      self.start_step, self.start_time = step, now
    due = now - self.last_time >= self.every or step == self.total
    if step == self.last_step or not (due or force):
      return
    self.last_time, self.last_step = now, step
    done = step - self.start_step
    rate = done / max(now - self.start_time, 1e-9) if done else float("nan")
    eta = format_duration((self.total - step) / rate) if done else "?"
    rate_text = f"{rate:.2f} it/s" if done else "compiled"
    values = jax.device_get(self.latest)
    losses = " ".join(f"{k} {float(values[k]):.4g}" for k in self.KEYS if k in values)
    say("step %d/%d (%d%%) | %s | ETA %s%s", step, self.total, 100 * step // self.total,
        rate_text, eta, f" | {losses}" if losses else "")
    if self.writer is not None and done:
      self.writer.write_scalars(step, {"steps_per_sec": rate})
