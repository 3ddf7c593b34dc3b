"""Progress on the terminal, one way for every CLI (train, eval, data prepare, sweep): lines on stderr, flushed, so
stdout stays for what a command is asked to print."""

import sys
import time


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


class Progress:
  """`progress(done, note="")` prints 'task: done/total unit, rate unit/s[, note]' at most every `every` seconds,
  and always at the end (done == total). `first`: where counting starts (a resumed run's step), for the rate;
  `rate=False` leaves the rate out (a sweep's points, hours apart, have none worth printing)."""

  def __init__(self, task: str, total: int | None, unit: str = "items", every: float = 2.0, stream=None,
               first: int = 0, rate: bool = True, start: float | None = None):
    self.task, self.total, self.unit, self.every, self.first, self.rate = task, total, unit, every, first, rate
    self.stream = stream or sys.stderr
    # start: when counting began (a bar made at its first report would divide by ~0 s)
    self.last = time.time()
    self.start = self.last if start is None else start

  def __call__(self, done: int, note: str = ""):
    now = time.time()
    if now - self.last < self.every and done != self.total:
      return
    self.last = now
    parts = [f"{self.task}: {done}{f'/{self.total}' if self.total else ''} {self.unit}"]
    if self.rate:
      parts.append(f"{(done - self.first) / max(now - self.start, 1e-9):.1f} {self.unit}/s")
    print(", ".join(parts + ([note] if note else [])), file=self.stream, flush=True)
