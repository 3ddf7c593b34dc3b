"""A run directory: where each of its files lives, which checkpoint steps it holds, and its config.

    RUN_DIR/
      checkpoints/<step>/   Orbax step folders (checkpoint.py writes them; a save in progress is not a digit name)
        meta/metadata       the step's JSON meta: identity, the resolved config ("config")
      metrics.jsonl         one JSON row per logged step (metrics.py)
      tensorboard/ wandb/   the same metrics for those tools
      export/               end-of-run exports (export.py)
      diagnostics.json      python -m jaxtele.eval.diagnose
      forgetting_base.json  frontier.json   gain against forgetting (forgetting.py, frontier.py)
      sweep_point.json      how a sweep point ended (sweep.py)

`RunDir.config()` is the one place where a stored config is brought up to date: the current defaults updated
with what the run stored, so a key added after the run was trained reads as its default, never as missing.
An exported folder carries the same config in `jaxtele_run.json` (`record_config`). Reads files only: the
config defaults import the package, no checkpoint is restored here.
"""

import json
import os

from jaxtele.errors import JaxteleError

CHECKPOINTS, META_ITEM, META_FILE = "checkpoints", "meta", "metadata"
METRICS, TENSORBOARD, WANDB, EXPORT = "metrics.jsonl", "tensorboard", "wandb", "export"
DIAGNOSTICS, FORGETTING_BASE, FRONTIER, SWEEP_POINT = ("diagnostics.json", "forgetting_base.json", "frontier.json",
                                                       "sweep_point.json")
RUN_RECORD = "jaxtele_run.json"  # the run's config beside an export's weights


class RunDir:
  def __init__(self, path: str):
    self.path = os.fspath(path)

  def file(self, name: str) -> str:
    """The path of one of the run's files or folders (the names above)."""
    return os.path.join(self.path, name)

  @property
  def checkpoints(self) -> str:
    return os.path.abspath(self.file(CHECKPOINTS))  # Orbax wants an absolute path

  @property
  def metrics(self) -> str:
    return self.file(METRICS)

  def is_run(self) -> bool:
    """A folder the trainer wrote checkpoints into (perhaps none complete yet)."""
    return os.path.isdir(self.checkpoints)

  def steps(self) -> list[int]:
    """The complete checkpoint steps, ascending (Orbax renames a step folder into place when it is whole)."""
    if not self.is_run():
      return []
    return sorted(int(d) for d in os.listdir(self.checkpoints) if d.isdigit())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def step(self, step: int | None = None) -> int:
    """`step`, checked to be on disk, or the latest; one line when there is none."""
    steps = self.steps()
    if not steps:
      raise JaxteleError(f"{self.checkpoints}: no checkpoint")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise JaxteleError(f"{self.checkpoints}: no step {step} (saved: {', '.join(map(str, steps))})")
    return step

  def step_dir(self, step: int) -> str:
    return os.path.join(self.checkpoints, str(step))

  def meta(self, step: int | None = None) -> dict:
    """A step's JSON meta (latest step by default)."""
    path = os.path.join(self.step_dir(self.step(step)), META_ITEM, META_FILE)
    return read_json(path, "checkpoint meta")

  def config(self, step: int | None = None):
    """The run's config (ConfigDict): the defaults updated with the one stored at `step` (default latest)."""
    return up_to_date(self.meta(step).get("config"), self.step_dir(self.step(step)))

  def latest_config(self):
    """The config of the newest step whose meta reads, else the defaults (None for a folder with no checkpoint):
    the report and the frontier read what they can."""
    for step in reversed(self.steps()):
      try:
        return self.config(step)
      except JaxteleError:
        continue
    return None


def up_to_date(stored, where: str):
  """The training defaults updated with `stored` (a dict read back from JSON); keys the defaults no longer have
  are kept as they were stored."""
  import ml_collections

  from jaxtele.config import default_config

  if not isinstance(stored, dict):
    raise JaxteleError(f"{where}: no stored config (not a jaxtele run, or a damaged checkpoint)")
  return ml_collections.ConfigDict(_overlay(default_config().to_dict(), stored))


def _overlay(defaults: dict, stored: dict) -> dict:
  out = dict(defaults)
  for key, value in stored.items():
    both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    out[key] = _overlay(defaults[key], value) if both else value
  return out


def read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise JaxteleError(f"{path}: missing ({what})") from None
  except json.JSONDecodeError as e:
    raise JaxteleError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def write_record(folder: str, cfg):
  """The run's resolved config beside exported weights: evaluation prompts with its SFT template."""
  with open(os.path.join(folder, RUN_RECORD), "w") as f:
    f.write(cfg.to_json(indent=2))


def record_config(folder: str):
  """The config recorded beside an export (brought up to date), or None when the folder has no record."""
  path = os.path.join(folder, RUN_RECORD)
  if not os.path.isfile(path):
    return None
  return up_to_date(read_json(path, "run record"), path)
