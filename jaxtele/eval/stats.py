"""Paired statistics for two models scored on the same items: an exact McNemar test for right/wrong outcomes and a
paired bootstrap for corpus-level ratios (loss, bits per byte, mean F1). Two separate intervals overlap long before
a paired test stops resolving a difference, so models are compared only this way.

Shape letters (jaxtele/models/__init__.py): Z bootstrap replicates, U units (items or documents).
"""

import numpy as np

LEVEL = 0.95


def mcnemar_exact(only_a: int, only_b: int) -> float:
  """Two-sided exact McNemar p-value: under H0 the discordant pairs split Binomial(only_a + only_b, 1/2).
  Exact integer arithmetic (n in the thousands stays exact): p = min(1, 2 * P(X <= min))."""
  n, k = only_a + only_b, min(only_a, only_b)
  if n == 0:
    return 1.0
  tail, term = 0, 1  # term = C(n, i), built up incrementally
  for i in range(k + 1):
    tail += term
    term = term * (n - i) // (i + 1)
  if 2 * k == n:  # the two tails meet in the middle: the whole distribution
    return 1.0
  return min(1.0, 2 * tail / (1 << n))


def paired_bootstrap(num_a, den_a, num_b, den_b, transform=None, samples: int = 2000, seed: int = 0,
                     level: float = LEVEL, chunk: int = 250) -> dict:
  """Difference f(sum num_a / sum den_a) - f(sum num_b / sum den_b) of two corpus-level ratios over the same U
  units, with a percentile interval from resampling units (the same draw for both models: the pairing).

  The units are documents for loss (num nll, den tokens) and bits per byte (num nll/ln 2, den bytes), items for
  a mean (num the score, den 1). `transform` maps a ratio to the reported metric (np.exp: perplexity)."""
  arrays = [np.asarray(x, np.float64) for x in (num_a, den_a, num_b, den_b)]
  n = len(arrays[0])
  if n == 0 or any(len(x) != n for x in arrays):
    raise ValueError(f"paired_bootstrap: need four arrays of the same non-zero length, got {[len(x) for x in arrays]}")
  f = transform or (lambda x: x)
  diff = float(f(arrays[0].sum() / arrays[1].sum()) - f(arrays[2].sum() / arrays[3].sum()))
  rng = np.random.default_rng(seed)
  reps = []
  for start in range(0, samples, chunk):
    counts_RxN = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, samples - start)).astype(np.float64)
    na, da, nb, db = (counts_RxN @ x for x in arrays)
    reps.append(f(na / da) - f(nb / db))
  reps_Z = np.concatenate(reps)
  lo, hi = np.quantile(reps_Z, [(1 - level) / 2, (1 + level) / 2])
  return {"diff": diff, "ci": [float(lo), float(hi)], "level": level, "units": n, "samples": samples,
          "distinguishable": bool(lo > 0 or hi < 0)}


def verdict(distinguishable: bool, diff: float, higher_is_better: bool, level: float = LEVEL) -> str:
  """The table's reading of a paired result."""
  if not distinguishable:
    return f"not distinguishable at {level:.0%}"
  return "A better" if (diff > 0) == higher_is_better else "B better"
