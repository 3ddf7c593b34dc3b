"""The causal test of intruder dimensions: scale them and measure both domains.

`python -m jaxtele.eval.intruder_scale RUN_DIR [--lambdas 1,0.5,0] [--eps 0.5] [--k 10] [--step N] [--out FILE]`

For every decoder-layer kernel of a run's checkpoint (a LoRA run's merged kernel), the intruder dimensions are
found as `diagnose` finds them (among the top-k output-space singular vectors of W_tuned, those whose largest
|cosine| with every singular vector of W_base is below eps); their singular values are multiplied by lambda
(1: the run as trained, 0: the intruders removed) and every eval set of the run is scored. If intruders carry
the forgetting and not the learning, lambda -> 0 lowers the source / general loss and leaves the domain loss
(Shuttleworth et al. 2024 scale them the same way). Legend: I in, O out features.
"""

import argparse
import os
import sys

import numpy as np

from jaxtele.errors import JaxteleError, cli
from jaxtele.eval import reach
from jaxtele.eval.diagnose import intruder_similarity, write_result
from jaxtele.run import RunDir


def scale_intruders(base_IO: np.ndarray, tuned_IO: np.ndarray, lam: float, k: int = 10,
                    eps: float = 0.5) -> tuple[np.ndarray, int]:
  """(the tuned kernel with its intruders' singular values times lam, how many intruders it has)."""
  w_OI = np.asarray(tuned_IO, np.float64).T  # PyTorch layout: left singular vectors live in the output space
  u, s, vt = np.linalg.svd(w_OI, full_matrices=False)
  idx = np.flatnonzero(intruder_similarity(base_IO, tuned_IO, k) < eps)
  if lam == 1.0 or not idx.size:
    return np.asarray(tuned_IO, np.float64), int(idx.size)
  removed = (u[:, idx] * (s[idx] * (1.0 - lam))) @ vt[idx]  # sum over intruders i of (1 - lam) s_i u_i v_i^T
  return (w_OI - removed).T, int(idx.size)


def score(graphdef, params, frozen, kernels: dict, eval_sets: dict, max_batches: int = 0) -> dict:
  """{set: mean NLL per scored token} with the layers' kernels replaced by `kernels` (plain float weights), over
  the first `max_batches` batches of each set (0: all), as the trainer's evaluation reads them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxtele.step import loss_sums

  g_def, weights, rest = nnx.split(reach.plain_model(graphdef, params, frozen, kernels), nnx.Param, ...)
  step = jax.jit(lambda w, b: loss_sums(g_def, w, rest, b))
  out = {}
  for name, ds in eval_sets.items():
    total = count = 0.0
    for i, batch in enumerate(ds):
      if max_batches and i >= max_batches:
        break
      s, c = step(weights, {k: jnp.asarray(v) for k, v in batch.items()})
      total, count = total + float(s), count + float(c)
    out[name] = {"loss": total / max(count, 1.0), "tokens": count}
  return out


def lambda_test(run_dir: str, lambdas=(1.0, 0.5, 0.0), k: int = 10, eps: float = 0.5, step: int | None = None,
                base_src: str | None = None) -> dict:
  from flax import nnx

  from jaxtele.build import model_config
  from jaxtele.data import setup as data_setup
  from jaxtele.eval.diagnose import load, tuned_and_base

  cfg, graphdef, params, frozen, tokenizer = load(run_dir, step)
  if not cfg.eval.sets:
    raise JaxteleError(f"{run_dir}: the run has no eval sets to measure")
  tuned, base, _ = tuned_and_base(cfg, nnx.merge(graphdef, params, frozen), base_src)
  paths = [p for p in tuned if p in base]
  doc_tok = data_setup.doc_tokenizer(cfg, tokenizer, model_config(cfg.model).vocab_size)
  eval_sets = data_setup.eval_data(cfg, doc_tok)
  rows, counts = [], None
  for lam in lambdas:
    scaled = {p: scale_intruders(base[p], tuned[p], lam, k, eps) for p in paths}
    counts = counts or {".".join(map(str, p)): n for p, (_, n) in scaled.items()}
    sets = score(graphdef, params, frozen, {p: w for p, (w, _) in scaled.items()}, eval_sets, cfg.eval.max_batches)
    rows.append({"lambda": lam, "sets": sets})
  return {"run_dir": os.path.abspath(run_dir), "mode": cfg.train.mode, "k": k, "eps": eps,
          "intruders_total": sum(counts.values()), "intruders": counts, "rows": rows}


def table(result: dict) -> str:
  names = list(result["rows"][0]["sets"])
  lines = [f"{result['run_dir']}  mode={result['mode']}  intruders={result['intruders_total']} "
           f"(eps {result['eps']}, top {result['k']})", "lambda  " + "  ".join(f"{n:>16}" for n in names)]
  for r in result["rows"]:
    lines.append(f"{r['lambda']:6g}  " + "  ".join(f"{r['sets'][n]['loss']:16.4f}" for n in names))
  return "\n".join(lines)


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.intruder_scale", description=__doc__.split("\n")[0])
  p.add_argument("run_dir")
  p.add_argument("--lambdas", default="1,0.5,0", help="comma-separated scales of the intruder singular values")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--eps", type=float, default=0.5)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--base", default=None, help="base model to compare with (default: the run's own)")
  p.add_argument("--out", default=None, help="JSON output (default RUN_DIR/intruder_scale.json)")
  a = p.parse_args(argv)
  if not os.path.isdir(a.run_dir):
    raise JaxteleError(f"{a.run_dir}: no such run directory")
  try:
    lambdas = [float(x) for x in a.lambdas.split(",") if x.strip()]
  except ValueError:
    raise JaxteleError(f"--lambdas: expected numbers separated by commas, got {a.lambdas!r}") from None
  if not lambdas or any(not 0.0 <= x <= 1.0 for x in lambdas):
    raise JaxteleError(f"--lambdas: each scale must be in [0, 1], got {a.lambdas!r}")
  result = lambda_test(a.run_dir, lambdas, a.k, a.eps, a.step, a.base)
  write_result(result, a.out or RunDir(a.run_dir).file("intruder_scale.json"), table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
