"""Data pipeline throughput: (a) preparation (split + tokenize + write), (b) the online path
(read prepared shards + pack + batch) per packing method, with 0 and 2 Grain workers.

  python -m jaxtele.benchmarks.data --specs ../shared/data/3gpp --tokenizer MODEL [--seconds 10]
"""

import argparse
import tempfile
import time

from jaxtele.data import pipeline
from jaxtele.data.tokenize import DocTokenizer


def online(path, doc_tok, packing, workers, seq_len, batch, seconds):
  cfg = pipeline.default_config()
  cfg.sources = [{"type": "tfds", "path": path, "split": "train"}]
  cfg.update(format="tokens", seq_len=seq_len, batch_size=batch, packing=packing, workers=workers)
  it = iter(pipeline.build(cfg, doc_tok))
  next(it)  # start-up (worker spawn, first shard read) is not throughput
  slots = real = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    slots += b["tokens"].size
    real += int((b["segment_ids"] != 0).sum())
  dt = time.perf_counter() - t0
  it.close()
  return real / dt, real / slots


def main():
  from jaxtele.convert import load_tokenizer, model_config
  from jaxtele.data.prepare import prepare_3gpp

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--specs", required=True)
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seconds", type=float, default=10)
  args = p.parse_args()
  tok = load_tokenizer(args.tokenizer)
  vocab = model_config(args.tokenizer).vocab_size
  with tempfile.TemporaryDirectory() as out:
    stats = prepare_3gpp(args.specs, out, tok, vocab, log=lambda s: None)
    total = sum(stats["tokens"].values())
    rows = [("prepare: split + tokenize + write", "-", "-", total / stats["seconds"]["total"], "-")]
    doc_tok = DocTokenizer(tok, vocab)
    for packing in ("first_fit", "best_fit", "concat"):
      for workers in (0, 2):
        tps, eff = online(stats["dataset_dir"], doc_tok, packing, workers, args.seq_len, args.batch, args.seconds)
        rows.append(("online: read + pack + batch", packing, workers, tps, f"{eff:.3f}"))
  print(f"\n{total:,} tokens prepared; online rows of {args.seq_len} tokens, batch {args.batch}\n")
  print("| path | packing | workers | tokens/s | packing efficiency |")
  print("|---|---|---|---:|---:|")
  for path, packing, workers, tps, eff in rows:
    print(f"| {path} | {packing} | {workers} | {tps:,.0f} | {eff} |")


if __name__ == "__main__":
  main()
