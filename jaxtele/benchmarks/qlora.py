"""QLoRA vs LoRA on SmolLM2-135M: bytes of the frozen linear kernels, and held-out loss after the same steps.

  python -m jaxtele.benchmarks.qlora [--steps 8] [--seq-len 128] [--batch 4] [--rank 8]

Three arms from the same GGUF, the same batches and seeds: LoRA on a bf16 base, LoRA on an NF4 base (QLoRA),
and NF4 with double-quantized scales. Text: clause 5 of TS 23.501 (`--spec`), consecutive windows; the last 8
windows are held out. Uses the trainer's own pieces (build_model, split_model, make_train_step).
"""

import argparse
import glob
import os
import time


def main():
  import jax
  import numpy as np

  from jaxtele import build
  from jaxtele.batch import whole_rows
  from jaxtele.config import default_config
  from jaxtele.convert import load_tokenizer, smollm2_gguf_path
  from jaxtele.models.lora import linears
  from jaxtele.optimizer import run_optimizer
  from jaxtele.step import init_state, make_eval_step, make_train_step

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--spec", default="../shared/data/3gpp")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--rank", type=int, default=8)
  args = p.parse_args()
  T, B = args.seq_len, args.batch
  text = open(sorted(glob.glob(os.path.join(args.spec, "*23.501*")))[0], encoding="utf-8").read()
  text = text[text.find("# 5"):][:60000]
  ids = np.asarray(load_tokenizer(smollm2_gguf_path())(text)["input_ids"])
  rows = ids[: len(ids) // (T + 1) * (T + 1)].reshape(-1, T + 1)

  def batch(r):
    return whole_rows(rows[r])

  held = batch(np.arange(len(rows) - 8, len(rows)))
  print(f"SmolLM2-135M (GGUF), LoRA r={args.rank} all-linear, seq {T} x batch {B}, {args.steps} steps, lr 2e-3 "
        f"constant; held-out: 8 x {T} tokens of TS 23.501 clause 5\n")
  print("| base | linear-kernel bytes | vs bf16 | held-out loss before | after | s/step |")
  print("|---|---:|---:|---:|---:|---:|")
  bf16_bytes = None
  for name, quant, dq in (("bf16", "none", False), ("nf4", "nf4", False), ("nf4 + double quant", "nf4", True)):
    cfg = default_config()
    cfg.model.source = smollm2_gguf_path()
    cfg.train.update(mode="lora", steps=args.steps)
    cfg.lora.update(rank=args.rank, alpha=2.0 * args.rank, base_dtype="bfloat16", quantize_base=quant, double_quant=dq)
    cfg.optimizer.update(lr=2e-3, schedule="constant", warmup_ratio=0.0, weight_decay=0.0, b2=0.999)
    model = build.build_model(cfg)
    lins = linears(model).values()
    nbytes = sum(m.quant.nbytes() if m.quant is not None else m.kernel[...].size * 2 for m in lins)
    bf16_bytes = bf16_bytes or nbytes
    graphdef, params, frozen = build.split_model(model, cfg)
    tx, _ = run_optimizer(cfg)
    state, step = init_state(params, tx), jax.jit(make_train_step(graphdef, tx, 1))
    evaluate = jax.jit(make_eval_step(graphdef))
    before = float(np.divide(*evaluate(params, frozen, held)))
    t0 = time.time()
    for i in range(args.steps):
      state, _ = step(state, frozen, batch(np.arange(i * B, (i + 1) * B)))
    after = float(np.divide(*evaluate(state["params"], frozen, held)))
    print(f"| {name} | {nbytes / 1e6:,.1f} MB | {bf16_bytes / nbytes:.2f}x smaller | {before:.3f} | {after:.3f} | "
          f"{(time.time() - t0) / args.steps:.1f} |", flush=True)


if __name__ == "__main__":
  main()
