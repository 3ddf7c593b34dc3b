"""`python -m jaxtele.eval --config configs/eval/<name>.py [--model SOURCE] [--out DIR] [--config.key=value ...]`"""

import sys

from jaxtele.config import load_config
from jaxtele.errors import JaxteleError, cli

USAGE = "usage: --config FILE [--model SOURCE] [--out DIR] [--config.key=value ...]"


@cli
def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  config_path, overrides, model, out = None, [], None, None
  i = 0
  while i < len(argv):
    a = argv[i]
    flag, eq, value = a.partition("=")
    if flag in ("--config", "--model", "--out") and not eq:
      if i + 1 >= len(argv):
        raise JaxteleError(f"{flag}: needs a value ({USAGE})")
      value, i = argv[i + 1], i + 1
    if flag == "--config":
      config_path = value
    elif flag == "--model":
      model = value
    elif flag == "--out":
      out = value
    elif a.startswith("--config."):
      overrides.append(a)
    else:
      raise JaxteleError(f"unknown argument {a!r} ({USAGE})")
    i += 1
  if not config_path:
    raise JaxteleError(f"--config: required ({USAGE})")
  cfg = load_config(config_path, overrides, check=lambda cfg: None)  # the runner validates, once --model is in
  if model is not None:
    cfg.model.source = model
  if out is not None:
    cfg.out = out
  from jaxtele.eval.runner import run

  run(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
