"""The GPU suite's first process: environment probe and kernel checks, one row each (`benchmarks/device.py`).

  python -m jaxtele.benchmarks.checks --out DIR [--smoke] [--fail NAME] [--hang NAME]

Every attention implementation at the real head shapes (SmolLM2: head dim 64, 9 query / 3 kv heads; Qwen2.5:
128, 12 / 2) on packed GQA rows with padding, forward and gradients, against an fp32 reference written here
(not the project's `xla` path, which is one of the implementations under test) run under `highest` matmul
precision; a run whose segment ids are erased must differ (the mask is honoured); the chunked loss against the
plain one. Errors are max |x - ref| / max |ref| over real (non-padding) query rows, per output and gradient.
A check that raises is recorded as failed with its message, and the next one runs. `--fail NAME` makes that
check raise (to prove the suite records it), `--hang NAME` makes it hang (to prove the suite stops a hung
kernel at its limit). Rows go to DIR/rows/<name>.json the moment each finishes.
Legend: B batch, T length, N query heads, K kv heads, H head dim, D model dim, V vocab.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

HEADS = {"smollm2": (9, 3, 64), "qwen2.5": (12, 2, 128)}  # N, K, H of the real models
IMPLS = ("xla", "cudnn", "pallas")
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "torch",
            "transformers", "peft", "triton", "numpy", "ml-collections", "grain", "tensorboardX", "gguf")
# Scale-free tolerances: bf16 rounds at 2^-8, and a kernel reassociates sums of up to T terms.
TOL = {"bfloat16": {"fwd": 2e-2, "grad": 5e-2}, "float32": {"fwd": 1e-4, "grad": 1e-4}}
LOSS_TOL = 1e-5
ERASED_MIN_DIFF = 0.1  # erasing the segments must move the outputs by far more than rounding


def write_row(out_dir: str, row: dict):
  os.makedirs(os.path.join(out_dir, "rows"), exist_ok=True)
  with open(os.path.join(out_dir, "rows", f"{row['name']}.json"), "w") as f:
    json.dump(row, f, indent=1)
  print(json.dumps(row), flush=True)


def probe() -> dict:
  import jax

  versions = {}
  for name in VERSIONS:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  dev = jax.devices()[0]
  return {"name": "env", "kind": "env", "status": "info", "python": platform.python_version(), "versions": versions,
          "backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_precision": str(jax.config.jax_default_matmul_precision),
          "xla_python_client": {k: v for k, v in os.environ.items() if k.startswith("XLA_PYTHON_CLIENT")}}


def reference_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  """fp32 softmax attention, kv heads repeated to N, the contract's mask spelled out per condition."""
  import jax
  import jax.numpy as jnp

  N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
  k_BSNH, v_BSNH = (jnp.repeat(x.astype(jnp.float32), N // K, axis=2) for x in (k_BSKH, v_BSKH))
  scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), k_BSNH) / np.sqrt(H)
  T = q_BTNH.shape[1]
  causal_TS = np.tril(np.ones((T, T), bool))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  visible_BTS = causal_TS & same_BTS & (segment_ids_BT[:, None, :] > 0)
  scores_BNTS = jnp.where(visible_BTS[:, None], scores_BNTS, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores_BNTS, axis=-1), v_BSNH)


def rel_err(x, ref, rows_BT=None) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if rows_BT is not None:
    x, ref = x[rows_BT], ref[rows_BT]
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def packed_segments(B: int, T: int):
  """Packed rows: documents of a few lengths and padding at the end of every row."""
  from jaxtele.benchmarks.batches import packed_batch

  seg_BT = packed_batch(B, T, vocab=2, mean_doc=max(T // 4, 8), seed=1)["segment_ids"]
  seg_BT[:, -max(T // 16, 2):] = 0
  return seg_BT


def attention_case(impl, N, K, H, B, T, dtype, seed=0):
  """(fwd + grads of the implementation, of the reference, valid rows, the erased-segment output)."""
  import jax
  import jax.numpy as jnp

  from jaxtele.models.attention import attention

  rng = np.random.default_rng(seed)
  seg_BT = packed_segments(B, T)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), dtype) for n in (N, K, K))
  valid_BT = seg_BT > 0
  cot_BTNH = jnp.asarray(rng.standard_normal((B, T, N, H)) * valid_BT[..., None, None], jnp.float32)

  def run(fn, seg, *qkv):
    out, vjp = jax.vjp(lambda *a: fn(*a, seg).astype(jnp.float32), *qkv)
    return (out, *vjp(cot_BTNH))

  ours = jax.jit(lambda *a: run(lambda q, k, v, s: attention(q, k, v, s, impl=impl), jnp.asarray(seg_BT), *a))
  got = ours(q, k, v)
  erased = jax.jit(lambda *a: attention(*a, jnp.ones_like(jnp.asarray(seg_BT)), impl=impl))(q, k, v)
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(lambda *a: run(reference_attention, jnp.asarray(seg_BT), *a))(*f32)
  return got, ref, valid_BT, erased


def check_attention(impl, model, B, T, dtype) -> list[dict]:
  N, K, H = heads(model)
  got, ref, valid, erased = attention_case(impl, N, K, H, B, T, dtype)
  tol = TOL[dtype]
  names = ("out", "dq", "dk", "dv")
  errs = {n: rel_err(g, r, valid if n == "out" else None) for n, g, r in zip(names, got, ref)}
  fwd_ok, grad_ok = errs["out"] <= tol["fwd"], max(errs[n] for n in names[1:]) <= tol["grad"]
  diff = rel_err(erased, got[0], valid)
  base = f"{impl}_{model}"
  shape = f"B{B} T{T} N{N} K{K} H{H} {dtype}, packed + padding"
  return [
      {"name": f"{base}_fwd", "status": "pass" if fwd_ok else "fail", "max_err": errs["out"], "tol": tol["fwd"],
       "detail": shape},
      {"name": f"{base}_grad", "status": "pass" if grad_ok else "fail", "max_err": max(errs[n] for n in names[1:]),
       "tol": tol["grad"], "detail": ", ".join(f"{n} {errs[n]:.2e}" for n in names[1:])},
      {"name": f"{base}_segments_erased_differs", "status": "pass" if diff > ERASED_MIN_DIFF else "fail",
       "max_err": diff, "tol": ERASED_MIN_DIFF, "detail": "all-ones segment ids must change the output (> tol)"},
  ]


def check_chunked_loss(B, T, D, V, chunk) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from jaxtele.benchmarks.batches import packed_batch
  from jaxtele.loss import chunked_sum_and_count, masked_sum_and_count

  rng = np.random.default_rng(2)
  b = packed_batch(B, T, V, mean_doc=max(T // 4, 8), seed=2)
  h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((D, V)) / np.sqrt(D), jnp.float32)
  targets, mask = jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"])

  def mean(fn):
    def f(h, w):
      s, c = fn(h, w)
      return s / c
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  plain = mean(lambda h, w: masked_sum_and_count(jnp.einsum("btd,dv->btv", h, w), targets, mask))
  chunked = mean(lambda h, w: chunked_sum_and_count(h, w, targets, mask, chunk))
  with jax.default_matmul_precision("highest"):
    (lp, (dhp, dwp)), (lc, (dhc, dwc)) = plain(h, w), chunked(h, w)
  errs = {"loss": abs(float(lc) - float(lp)) / abs(float(lp)), "dh": rel_err(dhc, dhp), "dw": rel_err(dwc, dwp)}
  worst = max(errs.values())
  return [{"name": "chunked_loss", "status": "pass" if worst <= LOSS_TOL else "fail", "max_err": worst,
           "tol": LOSS_TOL, "detail": f"B{B} T{T} D{D} V{V} chunk {chunk} fp32 highest: "
                                      + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())}]


def heads(model: str):
  if model in HEADS:
    return HEADS[model]
  from jaxtele.models.presets import PRESETS

  cfg = PRESETS[model]
  return cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def plan(smoke: bool):
  """(name, function) per check; `name` is what --fail takes. Smoke: the tiny preset's heads, short rows."""
  B, T = (2, 32) if smoke else (2, 2048)
  dtype = "bfloat16"
  checks = []
  for model in (("tiny",) if smoke else HEADS):
    for impl in IMPLS:
      checks.append((f"{impl}_{model}", lambda impl=impl, model=model: check_attention(impl, model, B, T, dtype)))
  D, V = (64, 512) if smoke else (576, 49152)
  checks.append(("chunked_loss", lambda: check_chunked_loss(B, T, D, V, 16 if smoke else 1024)))
  return checks


def run_checks(out_dir: str, smoke: bool, fail: str = "", only: str = "", hang: str = "") -> int:
  import jax

  from jaxtele.errors import JaxteleError

  write_row(out_dir, probe())
  failed = 0
  for name, fn in plan(smoke):
    if only and not re.search(only, name):
      continue
    t0 = time.perf_counter()
    try:
      if name == fail:
        raise RuntimeError(f"injected failure (--fail {name})")
      while name == hang:  # as a kernel that never returns: only the suite's limit ends it
        time.sleep(1)
      rows = fn()
    except JaxteleError as e:  # the implementation refuses this backend or shape: a skip, with its reason
      rows = [{"name": name, "status": "skip", "detail": str(e)}]
    except Exception as e:  # noqa: BLE001 - one failing check never stops the rest
      tb = traceback.format_exception_only(type(e), e)[-1].strip()
      rows = [{"name": name, "status": "fail", "detail": tb[:400]}]
    for row in rows:
      row.update(kind="check", seconds=round(time.perf_counter() - t0, 2))
      failed += row["status"] == "fail"
      write_row(out_dir, row)
  return failed


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--fail", default="", help="make the check of this name raise (tests the failure path)")
  p.add_argument("--hang", default="", help="make the check of this name hang (tests the stop path)")
  p.add_argument("--only", default="", help="regex: run only the checks whose names match")
  args = p.parse_args()
  sys.exit(1 if run_checks(args.out, args.smoke, args.fail, args.only, args.hang) else 0)


if __name__ == "__main__":
  main()
