"""What every command-line tool shares: absl's runner, its own FlagValues, a quiet
console, and user errors as one line with exit code 1.

Each tool defines its flags on a FlagValues of its own (`new_flags()`), so
tools can be imported together (tests, notebooks) without clashing names, and
runs through `absl.app.run` (`entry_point`): absl's own flags (--verbosity,
--only_check_args, --helpfull) work as for any absl program. `--help` prints
the tool's docstring and its flags and exits 0; a bad flag is one line and
exit code 2. A user's mistake (a missing file, a bad flag value, a hostile or
corrupt file) ends in `TOOL: error: MESSAGE` on stderr and exit code 1, never a
traceback; anything else is a bug and keeps its traceback.
"""

import os
import pickle
import sys
from typing import Callable, Sequence

# TensorFlow is imported only to write TensorBoard summaries (clu); without this its
# oneDNN notice is printed on every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fdistill_jax import console  # noqa: E402

# Exceptions that mean "the input was wrong", reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, pickle.UnpicklingError)
HELP_ARGS = ("--help", "-h", "--helpshort", "-?")


def new_flags() -> flags.FlagValues:
  """An empty FlagValues for one tool."""
  return flags.FlagValues()


def exit_on_help(argv: Sequence[str], doc: str, flags_help: str):
  """Prints `doc` and `flags_help` and exits 0 when argv asks for --help (before `--`)."""
  args = list(argv[1:])
  args = args[:args.index("--")] if "--" in args else args
  if any(a in HELP_ARGS for a in args):
    flags_help = "\n".join(line for line in flags_help.strip().splitlines()   # no module paths
                           if line.startswith(" ") or not line.endswith(":"))
    print(f"{doc.strip()}\n\nFlags:\n{flags_help}\n\n(absl's own flags: --helpfull)")
    sys.exit(0)


def call(main: Callable, name: str, argv: Sequence[str]) -> int:
  """main(argv) with user errors reported as one line; returns the exit code."""
  try:
    result = main(argv)
  except USER_ERRORS as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 1
  return 0 if result is None else int(result)


def _parse(fv: flags.FlagValues, argv: Sequence[str], name: str, known_only=False):
  try:
    return fv(list(argv), known_only=known_only)
  except flags.Error as e:
    message = "; ".join(str(e).splitlines())
    print(f"{name}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def parse(fv: flags.FlagValues, argv: Sequence[str], name: str, doc: str = ""):
  """Parses argv (program name first) into `fv` alone: --help prints `doc` and the flags
  and exits 0, a bad flag exits 2 in one line. For callers that are not absl programs
  (benchmarks' `parse_args`); tools run through `entry_point`."""
  exit_on_help(argv, doc, fv.get_help(include_special_flags=False))
  return _parse(fv, argv, name)


def flags_parser(fv: flags.FlagValues, name: str, doc: str = ""):
  """absl's `flags_parser` for a tool: --help, then the tool's flags, then absl's own."""
  def parse(argv):
    exit_on_help(argv, doc, fv.get_help(include_special_flags=False))
    rest = _parse(fv, argv, name, known_only=True)
    return _parse(flags.FLAGS, rest, name)    # absl's flags; anything left is unknown
  return parse


def entry_point(main: Callable, name: str, fv: flags.FlagValues, doc: str = ""):
  """A no-argument callable running the tool on sys.argv through `absl.app.run`
  (console scripts, `__main__`)."""
  def tool_main(argv):
    console.quiet_console()
    return call(main, name, argv)

  def run_tool():
    app.run(tool_main, flags_parser=flags_parser(fv, name, doc))
  run_tool.__name__ = run_tool.__qualname__ = f"{name}_cli"
  run_tool.__doc__ = f"`{name}` on sys.argv (see pyproject.toml [project.scripts])."
  return run_tool


def invoke(main: Callable, name: str, fv: flags.FlagValues, args: Sequence[str]) -> int:
  """Runs a tool in this process as `name ARGS...` would (tests, notebooks): the exit code.

  The flags are reset first, so consecutive calls do not see each other's values.
  """
  fv.unparse_flags()
  return call(main, name, _parse(fv, [name, *args], name))
