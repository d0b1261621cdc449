"""What every command-line tool shares: its own absl FlagValues, a quiet console, and
user errors as one line with exit code 1.

Each tool defines its flags on a FlagValues of its own (`define_flags()`), so
tools can be imported together (tests, notebooks) without clashing names. A
user's mistake (a missing file, a bad flag value, a hostile or corrupt file)
ends in `TOOL: error: MESSAGE` on stderr and exit code 1, never a traceback;
anything else is a bug and keeps its traceback.
"""

import os
import pickle
import sys
from typing import Callable, Sequence

# TensorFlow is imported only to write TensorBoard summaries (clu); without this its
# oneDNN notice is printed on every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags  # noqa: E402

from fdistill_jax import console  # noqa: E402

# Exceptions that mean "the input was wrong", reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, pickle.UnpicklingError)


def new_flags() -> flags.FlagValues:
  """An empty FlagValues for one tool (--help is handled by `parse`)."""
  return flags.FlagValues()


def call(main: Callable, name: str, argv: Sequence[str]) -> int:
  """main(argv) with user errors reported as one line; returns the exit code."""
  try:
    result = main(argv)
  except USER_ERRORS as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 1
  return 0 if result is None else int(result)


def parse(fv: flags.FlagValues, argv: Sequence[str], name: str, doc: str = ""):
  """Parses argv into fv; --help prints `doc` and the flags and exits 0, bad flags exit 2."""
  if "--help" in argv[1:] or "-h" in argv[1:]:
    print(doc.strip() + "\n\nFlags:\n" + fv.get_help())
    sys.exit(0)
  try:
    return fv(list(argv))
  except flags.Error as e:
    print(f"{name}: error: {e} (see --help)", file=sys.stderr)
    sys.exit(2)


def run(main: Callable, name: str, fv: flags.FlagValues, doc: str = ""):
  """The tool's entry point: parse sys.argv into fv, keep the console quiet, run main."""
  argv = parse(fv, sys.argv, name, doc)
  console.quiet_console()
  sys.exit(call(main, name, argv))


def entry_point(main: Callable, name: str, fv: flags.FlagValues, doc: str = ""):
  """A no-argument callable running the tool on sys.argv (console scripts, `__main__`)."""
  def run_tool():
    run(main, name, fv, doc)
  run_tool.__name__ = run_tool.__qualname__ = f"{name}_cli"
  run_tool.__doc__ = f"`{name}` on sys.argv (see pyproject.toml [project.scripts])."
  return run_tool


def invoke(main: Callable, name: str, fv: flags.FlagValues, args: Sequence[str]) -> int:
  """Runs a tool in this process as `name ARGS...` would (tests, notebooks): the exit code.

  The flags are reset first, so consecutive calls do not see each other's values.
  """
  fv.unparse_flags()
  return call(main, name, parse(fv, [name, *args], name))
