"""The PyTorch side of `python -m jaxtele.benchmarks.train`: the same preset architecture, packed batch,
optimizer and timing in `transformers` (+ `peft` for LoRA).

Each row is labelled with what torch ran, so a ratio says what it compares:
- `--torch-mode eager` (stock `transformers`) or `compile` (`torch.compile` over model + loss);
- `--rows packed`: the same packed batch as jaxtele, documents kept apart by a dense block-diagonal causal
  mask [B, 1, T, S] handed to SDPA (the mask rules out SDPA's flash kernel on CUDA); `--rows causal`: plain
  causal rows (positions 0..T-1, `is_causal`, documents NOT separated), cheaper than the contract jaxtele keeps;
- the SDPA backend torch's dispatcher picked for the actual call (`torch._fused_sdp_choice` on the first call's
  arguments), or flash-attention 2 when the `flash_attn` package is installed (packed rows via `position_ids`).
bf16 autocast over fp32 master weights when --dtype bfloat16, and then a LoRA run's frozen base is stored in
bf16 as jaxtele's (`lora.base_dtype`); fused AdamW on CUDA (foreach elsewhere); gradient checkpointing when
--remat is not `none`. The loss is the same masked token cross-entropy over fp32 logits; MFU uses jaxtele's
FLOP count (`jaxtele.metrics`) for the same architecture.
"""

import argparse
import json
import resource
import statistics
import time
import types

MODES = ("eager", "compile")
ROWS = ("packed", "causal")


def hf_config(preset: str):
  import transformers

  from jaxtele.models.presets import PRESETS

  cfg = PRESETS[preset]
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
  return (transformers.Qwen2Config if cfg.model_type == "qwen2" else transformers.LlamaConfig)(**kw)


class SdpaProbe:
  """Records which SDPA backend the dispatcher picks for the model's own first attention call."""

  def __init__(self, torch):
    self.torch, self.choice, self.orig = torch, None, torch.nn.functional.scaled_dot_product_attention

  def __enter__(self):
    def wrapped(*args, **kw):
      if self.choice is None:
        try:
          from torch.nn.attention import SDPBackend

          self.choice = SDPBackend(self.torch._fused_sdp_choice(*args, **kw)).name.lower()
        except Exception as e:  # a private API: label the row rather than fail it
          self.choice = f"unknown ({type(e).__name__})"
      return self.orig(*args, **kw)

    self.torch.nn.functional.scaled_dot_product_attention = wrapped
    return self

  def __exit__(self, *exc):
    self.torch.nn.functional.scaled_dot_product_attention = self.orig


def build(args, torch, device):
  import importlib.util

  import transformers

  flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
  config = hf_config(args.preset)
  config._attn_implementation = "flash_attention_2" if flash else "sdpa"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.float32)
  if args.remat != "none":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if args.mode == "lora":
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear", lora_dropout=0.0))
    if args.dtype == "bfloat16":  # the frozen base in the compute dtype, as jaxtele's lora.base_dtype
      for p in model.parameters():
        if not p.requires_grad:
          p.data = p.data.to(torch.bfloat16)
  return model, flash


def batch_and_mask(args, torch, device, vocab, flash):
  from jaxtele.benchmarks.batches import packed_batch

  b = {k: torch.as_tensor(v, dtype=torch.long, device=device)
       for k, v in packed_batch(args.batch, args.seq_len, vocab).items()}
  if args.rows == "causal":
    b["positions"] = torch.arange(args.seq_len, device=device).expand(args.batch, -1).contiguous()
    return b, None, "causal rows (documents not separated)"
  if flash:
    return b, None, "packed (varlen via position_ids)"
  seg = b["segment_ids"]
  causal = torch.tril(torch.ones(args.seq_len, args.seq_len, dtype=torch.bool, device=device))
  mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & causal)[:, None]
  mask = mask | torch.eye(args.seq_len, dtype=torch.bool, device=device)  # padding rows attend to themselves
  return b, mask, "packed, dense [B,1,T,S] mask"


def measure(args) -> dict:
  import numpy as np
  import torch

  from jaxtele.metrics import flops_per_token, peak_flops
  from jaxtele.models.presets import PRESETS

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model, flash = build(args, torch, device)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          **({"fused": True} if device == "cuda" else {"foreach": True}))
  b, mask, rows_label = batch_and_mask(args, torch, device, model.config.vocab_size, flash)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def loss_fn(tokens, positions, targets, loss_mask, mask):
    with autocast:
      logits = model(input_ids=tokens, position_ids=positions, attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    m = loss_mask.flatten().float()
    return (nll * m).sum() / m.sum()

  inputs = (b["tokens"], b["positions"], b["targets"], b["loss_mask"], mask)
  backend = "flash_attn2"
  if not flash:  # one eager forward (grads on, as in training) tells which kernel SDPA dispatches to
    with SdpaProbe(torch) as probe:
      loss_fn(*inputs)
    backend = f"sdpa:{probe.choice}"
  fn = torch.compile(loss_fn) if args.torch_mode == "compile" else loss_fn

  def step():
    loss = fn(*inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  step()
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  sync()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  if device == "cuda":
    peak, kind, name = torch.cuda.max_memory_allocated(), "device", torch.cuda.get_device_name()
  else:
    peak, kind, name = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS", "cpu"
  n_train = sum(p.numel() for p in params)
  state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
  tps = args.batch * args.seq_len / dt
  fpt = flops_per_token(PRESETS[args.preset], args.seq_len, args.mode, n_train if args.mode == "lora" else 0)
  peak_f = peak_flops(types.SimpleNamespace(device_kind=name))
  base_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
  return {"impl": f"torch {torch.__version__} {args.torch_mode}", "mode": args.mode, "device": name,
          "torch_mode": args.torch_mode, "attention": backend, "rows": rows_label,
          "tokens_per_s": tps, "step_ms": 1000 * dt, "compile_s": first_s, "peak_bytes": peak, "peak_kind": kind,
          "mfu": tps * fpt / peak_f if peak_f else None, "loss": float(loss.detach()), "trainable_params": n_train,
          "total_params": sum(p.numel() for p in model.parameters()), "optimizer_state_bytes": state_bytes,
          "frozen_dtypes": base_dtypes, "threads": torch.get_num_threads(), "np": np.__version__}


def torch_args(p):
  p.add_argument("--torch-mode", default="eager", choices=MODES)
  p.add_argument("--rows", default="packed", choices=ROWS)


def main():
  from jaxtele.benchmarks.train import common_args

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common_args(p)
  torch_args(p)
  args = p.parse_args()
  print(json.dumps(measure(args)))


if __name__ == "__main__":
  main()
