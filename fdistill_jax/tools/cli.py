"""What every command-line tool shares: quiet console, and errors as one line, exit 1.

A user's mistake (a missing file, a bad flag value, a hostile or corrupt file)
ends in `TOOL: error: MESSAGE` on stderr and exit code 1, never a traceback;
anything else is a bug and keeps its traceback.
"""

import logging
import os
import pickle
import sys

# TensorFlow is imported only to write TensorBoard summaries (clu); without this its
# oneDNN notice is printed on every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402

from fdistill_jax.train import console  # noqa: E402

# Exceptions that mean "the input was wrong", reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, pickle.UnpicklingError)


def run(main, name):
  """absl's app.run(main) with the console kept quiet and user errors in one line."""
  def wrapped(argv):
    console.quiet_console()
    logging.getLogger("fdistill_jax").setLevel(logging.INFO)
    try:
      result = main(argv)
    except USER_ERRORS as e:
      print(f"{name}: error: {e}", file=sys.stderr)
      return 1
    return result
  app.run(wrapped)
