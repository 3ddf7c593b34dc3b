"""The PyTorch side of `python -m jaxtele.benchmarks.train`: the same preset architecture, packed batch,
optimizer and timing in `transformers` (+ `peft` for LoRA).

bf16 autocast over fp32 master weights when --dtype bfloat16; attention: flash-attention 2 when the
`flash_attn` package is installed (packed rows through `position_ids`, its varlen path), else SDPA with a
block-diagonal causal mask; fused AdamW on CUDA (foreach elsewhere); gradient checkpointing when --remat is
not `none`. The loss is the same masked token cross-entropy over fp32 logits.
"""

import argparse
import json
import resource
import statistics
import time


def hf_config(preset: str):
  import transformers

  from jaxtele.models.presets import PRESETS

  cfg = PRESETS[preset]
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
  return (transformers.Qwen2Config if cfg.model_type == "qwen2" else transformers.LlamaConfig)(**kw)


def measure(args) -> dict:
  import importlib.util

  import numpy as np
  import torch
  import transformers

  from jaxtele.benchmarks.batches import packed_batch

  device = "cuda" if torch.cuda.is_available() else "cpu"
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
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          **({"fused": True} if device == "cuda" else {"foreach": True}))
  b = {k: torch.as_tensor(v, dtype=torch.long, device=device)
       for k, v in packed_batch(args.batch, args.seq_len, config.vocab_size).items()}
  if flash:
    mask = None
  else:  # block-diagonal causal: same segment, not padding, key <= query
    seg = b["segment_ids"]
    causal = torch.tril(torch.ones(args.seq_len, args.seq_len, dtype=torch.bool, device=device))
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & causal)[:, None]
    mask = mask | torch.eye(args.seq_len, dtype=torch.bool, device=device)  # padding rows attend to themselves
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def step():
    with autocast:
      logits = model(input_ids=b["tokens"], position_ids=b["positions"], attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), reduction="none")
    m = b["loss_mask"].flatten().float()
    loss = (nll * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
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
  return {"impl": f"torch {torch.__version__} ({'fa2' if flash else 'sdpa'})", "mode": args.mode, "device": name,
          "tokens_per_s": args.batch * args.seq_len / dt, "step_ms": 1000 * dt, "compile_s": first_s,
          "peak_bytes": peak, "peak_kind": kind, "mfu": None, "loss": float(loss), "trainable_params": n_train,
          "total_params": sum(p.numel() for p in model.parameters()), "optimizer_state_bytes": state_bytes,
          "threads": torch.get_num_threads(), "np": np.__version__}


def main():
  from jaxtele.benchmarks.train import common_args

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common_args(p)
  args = p.parse_args()
  print(json.dumps(measure(args)))


if __name__ == "__main__":
  main()
