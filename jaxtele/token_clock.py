"""Training progress in tokens: what every metrics row is keyed by besides the step, and the steps at which
`eval.at_tokens` / `eval.at_tokens_log` ask for an evaluation.

Tokens seen count input token slots (`data.batch_size` x `data.seq_len` per update, padding included, as
throughput counts them), so they follow from the step alone: exact after a resume, equal on every process.
An evaluation asked for at T tokens runs after the first update at which the run has seen >= T tokens.
"""

import math

from jaxtele.errors import JaxteleError
from jaxtele.metrics import TOKENS_PER_PARAM, TOKENS_PER_TRAINABLE, TOKENS_SEEN


def log_spaced(first: int, last: int, count: int) -> list[int]:
  """`count` token counts from `first` to `last`, evenly spaced in log (rounded; duplicates dropped)."""
  if count < 2 or not 0 < first < last:
    raise JaxteleError(f"config: eval.at_tokens_log: expected (first, last, count) with 0 < first < last and "
                       f"count >= 2, got {(first, last, count)}")
  ratio = (last / first) ** (1 / (count - 1))
  return sorted({round(first * ratio**i) for i in range(count - 1)} | {int(last)})


def requested_tokens(eval_cfg) -> list[int]:
  """Every token count of `eval.at_tokens` and `eval.at_tokens_log`, checked, sorted."""
  counts = list(eval_cfg.get("at_tokens", ()))
  for t in counts:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 or t != int(t):
      raise JaxteleError(f"config: eval.at_tokens: token counts must be positive integers, got {t!r}")
  log = tuple(eval_cfg.get("at_tokens_log", ()))
  if log:
    if len(log) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) for v in log):
      raise JaxteleError(f"config: eval.at_tokens_log: expected (first, last, count) integers, got {log!r}")
    counts += log_spaced(*(int(v) for v in log))
  return sorted({int(t) for t in counts})


class TokenClock:
  """Tokens seen and tokens per parameter at a step, and the steps `eval.at_tokens*` evaluate at."""

  def __init__(self, cfg, params: int, trainable: int):
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.params, self.trainable = params, trainable
    self.requested = requested_tokens(cfg.eval)
    steps = {t: math.ceil(t / self.tokens_per_step) for t in self.requested}
    self.eval_steps = {s for s in steps.values() if s <= cfg.train.steps}
    self.unreachable = [t for t, s in steps.items() if s > cfg.train.steps]

  def index(self, step: int) -> dict:
    seen = step * self.tokens_per_step
    return {TOKENS_SEEN: seen, TOKENS_PER_PARAM: seen / max(self.params, 1),
            TOKENS_PER_TRAINABLE: seen / max(self.trainable, 1)}
