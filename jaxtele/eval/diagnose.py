"""LoRA-vs-full diagnostics: how a run changed each weight matrix of its base, and its gradient norms.

`python -m jaxtele.eval.diagnose RUN_DIR [--base SRC] [--out FILE]` writes RUN_DIR/diagnostics.json (or FILE)
and prints a table. Per layer and module (q_proj ... down_proj):
- effective rank of dW = W_tuned - W_base: how many singular values hold `energy` (90%) of sum(s^2);
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
  among the top-k (10) singular vectors of W_tuned, those whose largest |cosine| with every singular vector
  of W_base is below eps (0.5). The paper compares left singular vectors of PyTorch weights [out, in], i.e.
  directions in the layer's output space; our kernels are [in, out] (HF's transpose), so those are the right
  singular vectors of the kernel, which is what is compared here.
- intruder counts for every eps of EPS_GRID, and each row's top similarities (their distribution);
- the update-to-weight ratio ||dW|| / ||W0|| per module type at every checkpoint of the run;
- rho, the share of the full-weight gradient's energy a LoRA adapter can reach at its current A and B, on
  one held-out batch (the run's first eval set; see reach.py for the derivation in our [in, out] layout);
- effective rank next to the most an update can have (as the adapter class says: LoRA the rank, PiSSA 2x,
  DoRA min(in, out); full: min(in, out)).
The tuned W of a LoRA run is the layer's `effective_kernel`: its adapter merged over `base_kernel`, in fp32 (a
bf16 base is upcast first, so rounding does not pose as a full-rank update; an NF4 base is dequantized, so its
quantization error does not either). Gradient norms come from metrics.jsonl: every train/grad_norm* key the
run logged, with each group's parameter count (the group each leaf declares, `step.grad_group`), so norms of
different parameter sets can be compared per parameter. Shapes: kernel_IO [in, out]. JAX is imported only to
load a run, so reading metrics (metrics.py) and the maths stay light.
"""

import argparse
import json
import os
import sys

import numpy as np

from jaxtele import source
from jaxtele.errors import JaxteleError, cli
from jaxtele.eval import reach
from jaxtele.run import DIAGNOSTICS, RunDir
from jaxtele.metrics import STEP, grad_key_group, grad_keys, read_metrics

EPS_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def effective_rank(dw_IO: np.ndarray, energy: float = 0.9) -> int:
  """Fewest singular values whose squares sum to >= `energy` of the total (0 for a zero matrix)."""
  s = np.linalg.svd(np.asarray(dw_IO, np.float64), compute_uv=False)
  e = np.square(s)
  total = e.sum()
  if total == 0:
    return 0
  return int(np.searchsorted(np.cumsum(e) / total, energy - 1e-12) + 1)


def output_singular_vectors(kernel_IO: np.ndarray) -> np.ndarray:
  """[out, min(in, out)] left singular vectors of the PyTorch weight W = kernel.T, by singular value."""
  u, _, _ = np.linalg.svd(np.asarray(kernel_IO, np.float32).T, full_matrices=False)
  return u


def intruder_similarity(base_IO: np.ndarray, tuned_IO: np.ndarray, k: int = 10) -> np.ndarray:
  """[min(k, rank)] for each of the tuned matrix's top-k output-space singular vectors, its largest
  |cosine similarity| with any singular vector of the base (singular vectors are unit norm)."""
  u_base, u_tuned = output_singular_vectors(base_IO), output_singular_vectors(tuned_IO)[:, :k]
  return np.abs(u_tuned.T @ u_base).max(axis=1)


def intruder_dimensions(base_IO: np.ndarray, tuned_IO: np.ndarray, k: int = 10, eps: float = 0.5) -> int:
  return int((intruder_similarity(base_IO, tuned_IO, k) < eps).sum())


def compare(base: dict, tuned: dict, k: int = 10, eps: float = 0.5, energy: float = 0.9,
            max_rank: dict | None = None) -> list[dict]:
  """One row per module path present in both {path tuple: kernel_IO} dicts; `max_rank` {path: int} (default
  min(in, out)) is the most rank an update of that module can have."""
  rows = []
  for path in sorted(tuned, key=lambda p: tuple(str(x).zfill(6) for x in p)):
    if path not in base:
      continue
    w0, w1 = np.asarray(base[path], np.float64), np.asarray(tuned[path], np.float64)
    if w0.shape != w1.shape:
      raise JaxteleError(f"diagnose: {'.'.join(map(str, path))}: base shape {w0.shape} != tuned {w1.shape}")
    dw = w1 - w0
    sims = intruder_similarity(w0, w1, k)
    layer = next((int(p) for p in path if str(p).isdigit()), None)
    rows.append({"path": ".".join(map(str, path)), "layer": layer, "module": str(path[-1]), "shape": list(w0.shape),
                 "dw_norm": float(np.linalg.norm(dw)), "rel_change": float(np.linalg.norm(dw) / np.linalg.norm(w0)),
                 "effective_rank": effective_rank(dw, energy),
                 "max_rank": int((max_rank or {}).get(path, min(w0.shape))), "intruders": int((sims < eps).sum()),
                 "top_similarity": [round(float(x), 4) for x in sims]})
  return rows


def summarize(rows: list[dict]) -> dict:
  """Per module type: mean effective rank, total and mean intruders, mean relative change."""
  out = {}
  names = sorted({r["module"] for r in rows}, key=lambda m: (MODULE_ORDER + (m,)).index(m))
  for m in names:
    rs = [r for r in rows if r["module"] == m]
    out[m] = {"modules": len(rs), "effective_rank_mean": float(np.mean([r["effective_rank"] for r in rs])),
              "effective_rank_max": max(r["effective_rank"] for r in rs), "max_rank": max(r["max_rank"] for r in rs),
              "intruders_total": sum(r["intruders"] for r in rs),
              "intruders_mean": float(np.mean([r["intruders"] for r in rs])),
              "rel_change_mean": float(np.mean([r["rel_change"] for r in rs]))}
    if all(r.get("rho") is not None for r in rs):
      out[m]["rho_mean"] = float(np.mean([r["rho"] for r in rs]))
  return out


def intruders_by_eps(rows: list[dict], grid=EPS_GRID) -> dict:
  """Intruder counts at each threshold, in total and per module type, from the rows' top similarities."""
  count = lambda rs, e: int(sum((np.asarray(r["top_similarity"]) < e).sum() for r in rs))  # noqa: E731
  modules = list(dict.fromkeys(r["module"] for r in rows))
  return {"eps": list(grid), "total": [count(rows, e) for e in grid],
          "by_module": {m: [count([r for r in rows if r["module"] == m], e) for e in grid] for m in modules}}


def grad_norms(run_dir: str, counts: dict | None = None) -> dict:
  """{key: {steps, values, mean, last[, parameters]}} for every gradient-norm key the run logged; `counts`
  ({group: parameters}) adds the size of the set each norm is taken over."""
  rows = read_metrics(run_dir)
  out = {}
  for key in grad_keys(rows):
    pts = [(r[STEP], r[key]) for r in rows if key in r]
    steps, values = zip(*pts)
    out[key] = {"steps": list(steps), "values": list(values), "mean": float(np.mean(values)),
                "last": float(values[-1])}
    if counts:
      group = grad_key_group(key)
      n = sum(counts.values()) if not group else counts.get(group)
      if n:
        out[key]["parameters"] = int(n)
  return out


def group_counts(params) -> dict:
  """{gradient-norm group: trainable parameters}, grouped as the train step groups its norms."""
  import jax

  from jaxtele.sharding import path_str
  from jaxtele.step import grad_group

  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    g = grad_group(path_str(path))
    out[g] = out.get(g, 0) + int(np.size(x))
  return out


def load(run_dir: str, step: int | None = None):
  """(cfg, graphdef, params, frozen with float leaves in fp32, tokenizer) of a run's checkpoint (an NF4 base's
  codes and block indices keep their integer types)."""
  import jax
  import jax.numpy as jnp

  from jaxtele import build

  cfg, graphdef, params, frozen, tokenizer = build.load_run(run_dir, step)
  frozen = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        frozen)
  return cfg, graphdef, params, frozen, tokenizer


def tuned_and_base(cfg, model, base_src: str | None = None):
  """({path: tuned kernel}, {path: base kernel}, {path: the update's maximum rank}) of a loaded run's model."""
  from jaxtele import build

  pairs = reach.kernels(model)
  if cfg.train.mode == "lora":
    adapters = {p: reach.active_adapter(lin) for p, lin in reach.layer_linears(model).items()}
    pairs = {p: w for p, w in pairs.items() if adapters[p] is not None}
    max_rank = {p: adapters[p].max_update_rank(pairs[p][0].shape) for p in pairs}
    base = {p: w0 for p, (w0, _) in pairs.items()}
  else:  # full FT: the pretrained source, or the same seeded random init the run started from
    max_rank, base = None, None
  tuned = {p: w for p, (_, w) in pairs.items()}
  if base_src:
    src = source.resolve(base_src, flags=source.Flags("--base"))
    base = {p: w for p, (w, _) in reach.kernels(source.model(src)).items()}
  elif base is None:
    base = {p: w for p, (w, _) in reach.kernels(build.build_model(cfg)).items()}
  return tuned, base, max_rank


def update_ratios(run_dir: str, graphdef, params, frozen, base: dict) -> dict:
  """{module type: {steps, values}}: ||W_t - W0|| / ||W0|| over all layers of that type, at every checkpoint."""
  from flax import nnx

  from jaxtele.checkpoint import Checkpointer

  out = {}
  with Checkpointer(run_dir, keep=1, async_save=False) as ckpt:
    for step in RunDir(run_dir).steps():
      model = nnx.merge(graphdef, ckpt.restore_params(step, params), frozen)
      dw2, w2 = {}, {}
      for path, (_, w) in reach.kernels(model).items():
        if path in base:
          m = str(path[-1])
          dw2[m] = dw2.get(m, 0.0) + float(np.sum(np.square(w.astype(np.float64) - base[path])))
          w2[m] = w2.get(m, 0.0) + float(np.sum(np.square(base[path].astype(np.float64))))
      for m in sorted(dw2, key=lambda m: (MODULE_ORDER + (m,)).index(m)):
        series = out.setdefault(m, {"steps": [], "values": []})
        series["steps"].append(int(step))
        series["values"].append(float(np.sqrt(dw2[m] / w2[m])) if w2[m] else float("nan"))
  return out


def held_out_batch(cfg, tokenizer):
  """The first batch of the run's first eval set (None without one)."""
  if not cfg.eval.sets:
    return None
  from jaxtele.build import model_config
  from jaxtele.data import setup as data_setup

  doc_tok = data_setup.doc_tokenizer(cfg, tokenizer, model_config(cfg.model).vocab_size)
  ds = next(iter(data_setup.eval_data(cfg, doc_tok).values()))
  return next(iter(ds), None)


def add_rho(rows: list[dict], model, graphdef, params, frozen, tuned: dict, batch):
  """rho per row (reach.reachable_fraction) at the adapters' current A and B, and its energy-weighted total."""
  import jax.numpy as jnp

  grads = reach.kernel_gradients(graphdef, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, tuned)
  ab = reach.factors(model)
  reached = total = 0.0
  for r in rows:
    path = next(p for p in tuned if ".".join(map(str, p)) == r["path"])
    g = grads[path]
    r["rho"] = reach.reachable_fraction(g, *ab[path])
    r["grad_norm"] = float(np.linalg.norm(g))
    reached, total = reached + r["rho"] * r["grad_norm"] ** 2, total + r["grad_norm"] ** 2
  return reached / total if total else None


def diagnose(run_dir: str, base_src: str | None = None, k: int = 10, eps: float = 0.5, energy: float = 0.9,
             step: int | None = None) -> dict:
  """The diagnostics of the run's checkpoint at `step` (default: the latest)."""
  from flax import nnx

  cfg, graphdef, params, frozen, tokenizer = load(run_dir, step)
  model = nnx.merge(graphdef, params, frozen)
  tuned, base, max_rank = tuned_and_base(cfg, model, base_src)
  rows = compare(base, tuned, k, eps, energy, max_rank)
  if not rows:
    raise JaxteleError(f"{run_dir}: no layer kernel of the run matches the base (wrong --base?)")
  rho, why = None, "a full fine-tuning run has no adapter"
  if cfg.train.mode == "lora":
    batch = held_out_batch(cfg, tokenizer)
    why = None if batch is not None else "the run has no eval set to take a held-out batch from"
    if batch is not None:
      rho = add_rho(rows, model, graphdef, params, frozen, tuned, batch)
  return {"run_dir": os.path.abspath(run_dir), "mode": cfg.train.mode,
          "lora_rank": cfg.lora.rank if cfg.train.mode == "lora" else None, "base": base_src or cfg.model.source,
          "k": k, "eps": eps, "energy": energy, "intruders_total": sum(r["intruders"] for r in rows),
          "intruders_by_eps": intruders_by_eps(rows), "rho": rho, "rho_skipped": why,
          "summary": summarize(rows), "rows": rows,
          "update_ratio": update_ratios(run_dir, graphdef, params, frozen, base),
          "grad_groups": group_counts(params), "grad_norms": grad_norms(run_dir, group_counts(params))}


def table(result: dict) -> str:
  lines = [f"{result['run_dir']}  mode={result['mode']}" + (f" rank={result['lora_rank']}" if result["lora_rank"]
                                                             else ""),
           f"{'module':<10} {'n':>3} {'eff.rank mean':>13} {'max':>4} {'of':>5} {'intruders':>9} {'|dW|/|W|':>9} "
           f"{'rho':>6}"]
  for m, s in result["summary"].items():
    rho = f"{s['rho_mean']:>6.3f}" if "rho_mean" in s else f"{'-':>6}"
    lines.append(f"{m:<10} {s['modules']:>3} {s['effective_rank_mean']:>13.1f} {s['effective_rank_max']:>4} "
                 f"{s['max_rank']:>5} {s['intruders_total']:>9} {s['rel_change_mean']:>9.2e} {rho}")
  ie = result["intruders_by_eps"]
  lines.append("intruders by eps: " + ", ".join(f"{e:g}: {n}" for e, n in zip(ie["eps"], ie["total"])))
  lines.append(f"rho (energy-weighted): {result['rho']:.4f}" if result["rho"] is not None
               else f"rho: skipped ({result['rho_skipped']})")
  for key, g in result["grad_norms"].items():
    n = f" over {g['parameters']:,} parameters" if "parameters" in g else ""
    lines.append(f"{key}: mean {g['mean']:.4g}, last {g['last']:.4g}{n}")
  return "\n".join(lines)


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.diagnose", description=__doc__.split("\n")[0])
  p.add_argument("run_dir")
  p.add_argument("--base", default=None, help="base model (any model source); default: the run's own")
  p.add_argument("--out", default=None, help="JSON output (default RUN_DIR/diagnostics.json)")
  p.add_argument("--k", type=int, default=10, help="top singular vectors checked for intruders")
  p.add_argument("--eps", type=float, default=0.5, help="intruder threshold on |cosine similarity|")
  p.add_argument("--energy", type=float, default=0.9, help="energy fraction for the effective rank")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to diagnose (default: the latest)")
  a = p.parse_args(argv)
  if not os.path.isdir(a.run_dir):
    raise JaxteleError(f"{a.run_dir}: no such run directory")
  kind = source.resolve(a.run_dir, flags=source.Flags("RUN_DIR")).kind
  if kind != "run":
    raise JaxteleError(f"{a.run_dir}: a {kind} source, not a run directory (diagnose compares a run to its base)")
  result = diagnose(a.run_dir, a.base, a.k, a.eps, a.energy, a.step)
  write_result(result, a.out or RunDir(a.run_dir).file(DIAGNOSTICS), table)
  return 0


def write_result(result: dict, out: str, table) -> None:
  """A diagnostic CLI's ending: the JSON beside the run, its table on stdout, where it went on stderr."""
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(table(result))
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
