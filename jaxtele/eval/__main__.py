"""`python -m jaxtele.eval --config configs/eval/<name>.py [--model SOURCE] [--out DIR] [--config.key=value ...]`"""

import sys

from jaxtele.config import load_config, split_argv
from jaxtele.errors import cli
from jaxtele.eval.config import check_rules

USAGE = "usage: --config FILE [--model SOURCE] [--out DIR] [--config.key=value ...]"


@cli
def main(argv=None):
  args = split_argv(sys.argv[1:] if argv is None else list(argv), USAGE, options=("--model", "--out"))
  cfg = load_config(args["config"], args["overrides"], check=check_rules)  # the runner validates across keys
  if "--model" in args:
    cfg.model.source = args["--model"]
  if "--out" in args:
    cfg.out = args["--out"]
  from jaxtele.eval.runner import run

  run(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
