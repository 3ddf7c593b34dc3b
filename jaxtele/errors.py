"""One error type for bad user input, and the CLI wrapper that turns it into one line."""

import contextlib
import functools
import os
import sys


class JaxteleError(ValueError):
  """Bad input (file, key, shape, id...). The message is one line that names the culprit."""


class ArgumentError(JaxteleError):
  """A library function's argument `name` is bad. The library knows no config: a caller that took the value
  from a config key renames it under `config_keys`."""

  def __init__(self, name: str, detail: str):
    self.name, self.detail = name, detail
    super().__init__(f"{name}: {detail}")


@contextlib.contextmanager
def config_keys(**keys: str):
  """Inside: an ArgumentError about argument `a` is raised again as one about config key `keys[a]`."""
  try:
    yield
  except ArgumentError as e:
    if e.name not in keys:
      raise
    raise JaxteleError(f"{keys[e.name]}: {e.detail}") from None


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
