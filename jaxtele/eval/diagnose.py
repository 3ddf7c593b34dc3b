"""LoRA-vs-full diagnostics: how a run changed each weight matrix of its base, and its gradient norms.

`python -m jaxtele.eval.diagnose RUN_DIR [--base SRC] [--out FILE]` writes RUN_DIR/diagnostics.json (or FILE)
and prints a table. Per layer and module (q_proj ... down_proj):
- effective rank of dW = W_tuned - W_base: how many singular values hold `energy` (90%) of sum(s^2);
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
  among the top-k (10) singular vectors of W_tuned, those whose largest |cosine| with every singular vector
  of W_base is below eps (0.5). The paper compares left singular vectors of PyTorch weights [out, in], i.e.
  directions in the layer's output space; our kernels are [in, out] (HF's transpose), so those are the right
  singular vectors of the kernel, which is what is compared here.
The tuned W of a LoRA run is the merged kernel, merged in fp32 (a bf16 base is upcast first, so rounding
of the merged kernel does not pose as a full-rank update). Gradient norms come from metrics.jsonl.
Shapes: kernel_IO [in, out]. JAX is imported only to load a run, so `read_metrics` and the maths stay light.
"""

import argparse
import json
import os
import sys

import numpy as np

from jaxtele.errors import JaxteleError, cli

GRAD_KEYS = ("train/grad_norm", "train/grad_norm/lora_a", "train/grad_norm/lora_b", "train/grad_norm/base")
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


def compare(base: dict, tuned: dict, k: int = 10, eps: float = 0.5, energy: float = 0.9) -> list[dict]:
  """One row per module path present in both {path tuple: kernel_IO} dicts."""
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
                 "effective_rank": effective_rank(dw, energy), "intruders": int((sims < eps).sum()),
                 "top_similarity": [round(float(x), 4) for x in sims]})
  return rows


def summarize(rows: list[dict]) -> dict:
  """Per module type: mean effective rank, total and mean intruders, mean relative change."""
  out = {}
  names = sorted({r["module"] for r in rows}, key=lambda m: (MODULE_ORDER + (m,)).index(m))
  for m in names:
    rs = [r for r in rows if r["module"] == m]
    out[m] = {"modules": len(rs), "effective_rank_mean": float(np.mean([r["effective_rank"] for r in rs])),
              "effective_rank_max": max(r["effective_rank"] for r in rs),
              "intruders_total": sum(r["intruders"] for r in rs),
              "intruders_mean": float(np.mean([r["intruders"] for r in rs])),
              "rel_change_mean": float(np.mean([r["rel_change"] for r in rs]))}
  return out


def read_metrics(run_dir: str) -> list[dict]:
  """metrics.jsonl rows; a step logged twice (a resumed run) keeps its last row."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  by_step = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise JaxteleError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
      by_step.setdefault(row.get("step"), {}).update(row)
  return [by_step[s] for s in sorted(by_step, key=lambda s: -1 if s is None else s)]


def grad_norms(run_dir: str) -> dict:
  """{key: {steps, values, mean, last}} for the gradient-norm keys the run logged."""
  rows = read_metrics(run_dir)
  out = {}
  for key in GRAD_KEYS:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      steps, values = zip(*pts)
      out[key] = {"steps": list(steps), "values": list(values), "mean": float(np.mean(values)),
                  "last": float(values[-1])}
  return out


def layer_kernels(model) -> dict:
  """{path: kernel_IO as fp32 numpy} of every Linear inside the decoder layers."""
  import jax
  from flax import nnx

  from jaxtele.models.layers import Linear

  return {tuple(p): np.asarray(jax.device_get(m.kernel[...]), np.float32)
          for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and p and p[0] == "layers"}


def tuned_and_base(run_dir: str, base_src: str | None = None):
  """(cfg, {path: tuned kernel}, {path: base kernel}) of a run's latest checkpoint."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxtele import build, convert
  from jaxtele.models.lora import lora_paths, merge_lora

  cfg, graphdef, params, frozen, _ = build.load_run(run_dir)
  frozen = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), frozen)
  model = nnx.merge(graphdef, params, frozen)
  if cfg.train.mode == "lora":
    adapted = set(lora_paths(model))
    base = {p: w for p, w in layer_kernels(model).items() if p in adapted}
    tuned = {p: w for p, w in layer_kernels(merge_lora(model)).items() if p in adapted}
  else:
    tuned = layer_kernels(model)
    base = None
  if base_src:
    base = layer_kernels(convert.load_pretrained(base_src).model)
  elif base is None:  # full FT: the pretrained source, or the same seeded random init the run started from
    base = layer_kernels(build.build_model(cfg))
  return cfg, tuned, base


def diagnose(run_dir: str, base_src: str | None = None, k: int = 10, eps: float = 0.5, energy: float = 0.9) -> dict:
  cfg, tuned, base = tuned_and_base(run_dir, base_src)
  rows = compare(base, tuned, k, eps, energy)
  if not rows:
    raise JaxteleError(f"{run_dir}: no layer kernel of the run matches the base (wrong --base?)")
  return {"run_dir": os.path.abspath(run_dir), "mode": cfg.train.mode,
          "lora_rank": cfg.lora.rank if cfg.train.mode == "lora" else None, "base": base_src or cfg.model.source,
          "k": k, "eps": eps, "energy": energy, "intruders_total": sum(r["intruders"] for r in rows),
          "summary": summarize(rows), "rows": rows, "grad_norms": grad_norms(run_dir)}


def table(result: dict) -> str:
  lines = [f"{result['run_dir']}  mode={result['mode']}" + (f" rank={result['lora_rank']}" if result["lora_rank"]
                                                             else ""),
           f"{'module':<10} {'n':>3} {'eff.rank mean':>13} {'max':>4} {'intruders':>9} {'|dW|/|W|':>9}"]
  for m, s in result["summary"].items():
    lines.append(f"{m:<10} {s['modules']:>3} {s['effective_rank_mean']:>13.1f} {s['effective_rank_max']:>4} "
                 f"{s['intruders_total']:>9} {s['rel_change_mean']:>9.2e}")
  for key, g in result["grad_norms"].items():
    lines.append(f"{key}: mean {g['mean']:.4g}, last {g['last']:.4g}")
  return "\n".join(lines)


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.diagnose", description=__doc__.split("\n")[0])
  p.add_argument("run_dir")
  p.add_argument("--base", default=None, help="base model (HF folder, hub id or .gguf); default: the run's own")
  p.add_argument("--out", default=None, help="JSON output (default RUN_DIR/diagnostics.json)")
  p.add_argument("--k", type=int, default=10, help="top singular vectors checked for intruders")
  p.add_argument("--eps", type=float, default=0.5, help="intruder threshold on |cosine similarity|")
  p.add_argument("--energy", type=float, default=0.9, help="energy fraction for the effective rank")
  a = p.parse_args(argv)
  if not os.path.isdir(a.run_dir):
    raise JaxteleError(f"{a.run_dir}: no such run directory")
  result = diagnose(a.run_dir, a.base, a.k, a.eps, a.energy)
  out = a.out or os.path.join(a.run_dir, "diagnostics.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(table(result))
  print(f"wrote {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
