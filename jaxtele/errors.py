"""One error type for bad user input, and the CLI wrapper that turns it into one line."""

import functools
import os
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


def read_json(path: str, missing: str = "no such file"):
  """The JSON value in `path`; a missing, non-UTF-8 or malformed file is one JaxteleError naming it (and the line).
  `missing` says what the file's absence means to the caller (e.g. "missing (not a PEFT adapter folder)")."""
  import json

  if not os.path.isfile(path):
    raise JaxteleError(f"{path}: {missing}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise JaxteleError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
  except UnicodeDecodeError:
    raise JaxteleError(f"{path}: not UTF-8") from None
