"""One error type for bad user input, and the CLI wrapper that turns it into one line."""

import functools
import sys


class JaxteleError(ValueError):
  """Bad input (file, key, shape, id...). The message is one line that names the culprit."""


def cli(main):
  """Run `main`; a JaxteleError (or a missing file) becomes `error: ...` on stderr and exit 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (JaxteleError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
