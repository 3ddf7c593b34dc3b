"""Training metrics: a progress line on the terminal, `metrics.jsonl` and TensorBoard events.

MFU (model FLOPs utilisation) = achieved model FLOPs/s / (devices x peak dense bf16 FLOPs/s per device).
Model FLOPs per trained token follow PaLM (appendix B): 6 N + 12 L H Q T for full fine-tuning, where
N = parameters in matmuls (lm_head included, the embedding lookup not), L layers, H query heads, Q head
dim, T sequence length. With a frozen base there are no weight gradients for it, so LoRA counts
4 N + 12 L H Q T (forward 2N, activation gradients 2N), adapter FLOPs neglected. Unknown devices
(CPU) report no MFU.
"""

import json
import os
import sys
import time

import jax

PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                   ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12))


def peak_flops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  return next((f for name, f in PEAK_BF16_FLOPS if name.lower() in kind.lower()), None)


def flops_per_token(model_cfg, seq_len: int, mode: str) -> float:
  D, F, L, V = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers, model_cfg.vocab_size
  H, K, Q = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
  n_matmul = L * (D * H * Q * 2 + D * K * Q * 2 + 3 * D * F) + D * V
  return (6 if mode == "full" else 4) * n_matmul + 12 * L * H * Q * seq_len


class MetricsWriter:
  def __init__(self, run_dir: str, enabled: bool = True):
    self.enabled = enabled
    self.start = time.time()
    if enabled:
      os.makedirs(run_dir, exist_ok=True)
      self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def write(self, step: int, metrics: dict, log=None):
    """Append to metrics.jsonl and TensorBoard; `log` also prints the perplexities (evaluations)."""
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    if log:
      log(f"step {step} eval: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("ppl")))
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def progress(self, step: int, total: int, metrics: dict):
    if not self.enabled:
      return
    parts = [f"step {step}/{total}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.2e}"), ("train/grad_norm", "gnorm {:.3f}"),
                     ("train/tokens_per_s", "{:,.0f} tok/s"), ("train/mfu", "MFU {:.1%}"),
                     ("train/packing_efficiency", "packed {:.0%}")):
      if metrics.get(key) is not None:
        parts.append(fmt.format(metrics[key]))
    parts.append(f"{time.time() - self.start:.0f}s")
    print(" | ".join(parts), file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
