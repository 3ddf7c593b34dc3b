"""Training metrics: the key names, throughput and MFU, a progress line on the terminal, `metrics.jsonl` (written
and read here), TensorBoard and, when `metrics.wandb.project` is set, Weights & Biases (the same keys and steps;
mode offline needs no network).

A metrics.jsonl row is {"step", the index keys (tokens seen...), metric keys}: `train/<name>` (train/loss,
train/grad_norm[/<group>]...), `eval/<set>/<stat>` (loss, ppl, tokens, bytes, bpb) and `forget/<name>`.

MFU (model FLOPs utilisation) = model FLOPs/s / (devices x peak dense bf16 FLOPs/s per device), counted as
PaLM (appendix B) and MaxText count them. Per input token, with N = parameters in matmuls (lm_head included,
the embedding lookup not), L layers, H query heads, Q head dim, T sequence length:
  full FT:  6 N + 6 L H Q T   (a causal mask halves PaLM's 12 L H Q T attention term)
  LoRA:     4 N + 6 N_adapter + 6 L H Q T   (the frozen base gets no weight gradients: forward 2N and
            activation gradients 2N; the adapters train fully)
Tokens count every input token (padding included), as the peers do; trained tokens are reported apart.
Devices whose peak is unknown (CPU) report no MFU.
"""

import json
import os
import time

from jaxtele.errors import JaxteleError
from jaxtele.progress import Progress
from jaxtele.run import TENSORBOARD, RunDir

STEP = "step"
TOKENS_SEEN, TOKENS_PER_PARAM, TOKENS_PER_TRAINABLE = "tokens_seen", "tokens_per_param", "tokens_per_trainable_param"
INDEX_KEYS = (TOKENS_SEEN, TOKENS_PER_PARAM, TOKENS_PER_TRAINABLE)  # what a row is keyed by besides the step
TRAIN, EVAL, FORGET = "train/", "eval/", "forget/"
TRAIN_LOSS, TRAIN_LR, GRAD_NORM = "train/loss", "train/lr", "train/grad_norm"


def train_key(name: str) -> str:
  return TRAIN + name


def eval_key(set_name: str, stat: str) -> str:
  """`eval/<set>/<stat>`: stat is loss, ppl, tokens, bytes or bpb."""
  return f"{EVAL}{set_name}/{stat}"


def eval_set_of(key: str, stat: str) -> str | None:
  """The set an `eval/<set>/<stat>` key names (None for any other key)."""
  if key.startswith(EVAL) and key.endswith("/" + stat) and len(key) > len(EVAL) + len(stat) + 1:
    return key[len(EVAL):-len(stat) - 1]
  return None


def forget_key(name: str) -> str:
  return FORGET + name


def grad_keys(rows: list[dict]) -> list[str]:
  """The gradient-norm keys a run logged (train/grad_norm and one per group), in first-seen order."""
  return list(dict.fromkeys(k for r in rows for k in r if k == GRAD_NORM or k.startswith(GRAD_NORM + "/")))


def grad_key_group(key: str) -> str:
  """'train/grad_norm/lora_b' -> 'lora_b'; the overall 'train/grad_norm' -> ''."""
  return key.removeprefix(GRAD_NORM).lstrip("/")


def read_metrics(run_dir: str) -> list[dict]:
  """RUN_DIR/metrics.jsonl rows by step ([] without the file); a step logged twice (a resumed run, or a train
  and an eval row) is one row, the later values winning."""
  path = RunDir(run_dir).metrics
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
      by_step.setdefault(row.get(STEP), {}).update(row)
  return [by_step[s] for s in sorted(by_step, key=lambda s: -1 if s is None else s)]


# Dense bf16 peak FLOP/s by device kind; the most specific name first (device_kind strings: "NVIDIA H100 80GB
# HBM3" is the SXM part, "NVIDIA H100 PCIe", "TPU v5 lite" is v5e, plain "TPU v5" / "TPU v5p" is v5p).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
                   ("TPU v6 lite", 918e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
                   ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12))


def peak_flops(device=None) -> float | None:
  import jax  # lazily: the metrics readers (reports, frontier, sweep summary) need no JAX

  kind = (device or jax.devices()[0]).device_kind
  return next((f for name, f in PEAK_BF16_FLOPS if name.lower() in kind.lower()), None)


def matmul_params(model_cfg) -> int:
  D, F, L, V = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers, model_cfg.vocab_size
  N, K, H = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
  return L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F) + D * V


def flops_per_token(model_cfg, seq_len: int, mode: str, adapter_params: int = 0) -> float:
  """Training FLOPs per input token (see the module docstring); `adapter_params`: trainable LoRA parameters."""
  L, H, Q = model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim
  attention = 6 * L * H * Q * seq_len
  if mode == "full":
    return 6 * matmul_params(model_cfg) + attention
  return 4 * matmul_params(model_cfg) + 6 * adapter_params + attention


class Throughput:
  """Since the last read: input tokens/s, trained tokens/s, MFU where the device's peak is known, and the
  packing efficiency (real tokens / slots) of this process's batches."""

  def __init__(self, flops_per_token: float):
    self.flops_per_token, self.peak = flops_per_token, peak_flops()
    self.reset()

  def reset(self):
    self.tokens, self.trained, self.efficiency, self.steps, self.tic = 0, 0, 0.0, 0, time.time()

  def add(self, tokens: int, trained: int, efficiency: float):
    self.tokens, self.trained = self.tokens + tokens, self.trained + trained
    self.efficiency, self.steps = self.efficiency + efficiency, self.steps + 1

  def read(self) -> dict:
    import jax

    dt = max(time.time() - self.tic, 1e-9)
    tps = self.tokens / dt
    mfu = tps * self.flops_per_token / (self.peak * jax.device_count()) if self.peak else None
    out = {train_key("tokens_per_s"): tps, train_key("trained_tokens_per_s"): self.trained / dt,
           train_key("mfu"): mfu, train_key("packing_efficiency"): self.efficiency / max(self.steps, 1)}
    self.reset()
    return out


def wandb_run(run_dir: str, wandb_cfg, config: dict | None = None):
  """A W&B run under `run_dir/wandb` (None when no project is set). Runs are kept apart by their own ids."""
  if not wandb_cfg or not wandb_cfg.get("project"):
    return None
  try:
    import wandb
  except ImportError:
    raise JaxteleError("metrics.wandb.project: wandb is not installed (pip install 'jaxtele[wandb]')") from None
  return wandb.init(project=wandb_cfg["project"], name=wandb_cfg.get("name") or os.path.basename(
      os.path.abspath(run_dir)), entity=wandb_cfg.get("entity") or None, mode=wandb_cfg.get("mode", "offline"),
      dir=run_dir, config=config, settings=wandb.Settings(silent=True, console="off"))


class MetricsWriter:
  def __init__(self, run_dir: str, enabled: bool = True, wandb=None, config: dict | None = None):
    self.enabled = enabled
    self.start = time.time()
    self.bar = None  # the progress line, from the first step logged
    self.wb = None
    if enabled:
      os.makedirs(run_dir, exist_ok=True)
      self.jsonl = open(RunDir(run_dir).metrics, "a")
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(RunDir(run_dir).file(TENSORBOARD))
      self.wb = wandb_run(run_dir, wandb, config)

  def write(self, step: int, metrics: dict, log=None, index: dict | None = None):
    """Append to metrics.jsonl and TensorBoard; `log` also prints the perplexities (evaluations). `index`: what
    the row is keyed by besides the step (tokens seen, tokens per parameter), written as given."""
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    if log:
      log(f"step {step} eval: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("ppl")))
    self.jsonl.write(json.dumps({STEP: step, **(index or {}), **metrics}) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if self.wb is not None:
      self.wb.log(metrics, step=step)

  def progress(self, step: int, total: int, metrics: dict, first: int = 0):
    """The training line: steps done, their rate since `first` (the step this process started at), metrics."""
    if not self.enabled:
      return
    if self.bar is None:
      self.bar = Progress("train", total, "steps", every=0, first=first, start=self.start)
    parts = []
    for key, fmt in ((TRAIN_LOSS, "loss {:.4f}"), (TRAIN_LR, "lr {:.2e}"), (GRAD_NORM, "gnorm {:.3f}"),
                     (train_key("tokens_per_s"), "{:,.0f} tok/s"), (train_key("mfu"), "MFU {:.1%}"),
                     (train_key("packing_efficiency"), "packed {:.0%}")):
      if metrics.get(key) is not None:
        parts.append(fmt.format(metrics[key]))
    parts.append(f"{time.time() - self.start:.0f}s")
    self.bar(step, " | ".join(parts))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
      if self.wb is not None:
        self.wb.finish()
