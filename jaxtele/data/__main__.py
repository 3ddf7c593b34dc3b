"""`python -m jaxtele.data`: prepare corpora, look at batches.

  python -m jaxtele.data prepare --input ../shared/data/3gpp --tokenizer MODEL --out data/telecom \
      [--heldout-specs 38.101-1,23.502] [--heldout-spec-fraction 0.1]
  python -m jaxtele.data inspect --config configs/quickstart.py [--batches 3] [--config.key=value ...]
  python -m jaxtele.data synthetic --out runs/corpus     # the quickstart's generated corpus
"""

import argparse
import sys

from jaxtele.errors import JaxteleError, cli


def prepare(args):
  from jaxtele.convert import load_tokenizer, model_config
  from jaxtele.data.prepare import prepare_3gpp

  vocab = model_config(args.tokenizer).vocab_size
  prepare_3gpp(args.input, args.out, load_tokenizer(args.tokenizer), vocab, args.eval_fraction, args.overwrite,
               heldout_specs=args.heldout_specs, heldout_spec_fraction=args.heldout_spec_fraction)


INSPECT_USAGE = "python -m jaxtele.data inspect --config FILE [--batches N] [--config.key=value ...]"


def inspect(argv):
  """Arguments as `train` takes them (the shared argv helper), plus `--batches N`."""
  from jaxtele.config import load_config, split_argv
  from jaxtele.data.pipeline import packing_efficiency
  from jaxtele.data.setup import data_for

  if argv[:1] in (["-h"], ["--help"]):
    print(f"usage: {INSPECT_USAGE}")
    return 0
  args = split_argv(argv, f"usage: {INSPECT_USAGE}", options=("--batches",))
  batches = args.get("--batches", "2")
  if not batches.isdigit() or int(batches) < 1:
    raise JaxteleError(f"--batches: expected a whole number >= 1, got {batches!r}")
  cfg = load_config(args["config"], args["overrides"])
  tok, ds = data_for(cfg, log=print)
  it = iter(ds)
  for i in range(int(batches)):
    b = next(it)
    shapes = {k: list(v.shape) for k, v in b.items()}
    print(f"batch {i}: {shapes} packing efficiency {packing_efficiency(b):.3f} "
          f"trained targets {int(b['loss_mask'].sum())} segments {segments(b)}")
  row = b["tokens"][0][b["segment_ids"][0] == b["segment_ids"][0][0]]
  print("first segment of the last batch:", repr(tok.decode(row)[:500]))


def synthetic(args):
  from jaxtele.data.synthetic import ensure_corpus

  paths = ensure_corpus(args.out, args.train_docs, args.eval_docs, args.seed)
  print(f"synthetic corpus: {paths['train']}, {paths['eval']}")


def segments(batch) -> int:
  """Documents or document pieces in a batch: segment starts that are not padding."""
  return int(((batch["positions"] == 0) & (batch["segment_ids"] != 0)).sum())


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.data", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  q = sub.add_parser("prepare", help="3GPP Markdown -> tokenized TFDS ArrayRecord dataset + stats.json")
  q.add_argument("--input", required=True, help="folder of 3GPP spec .md files")
  q.add_argument("--tokenizer", required=True, help="model whose tokenizer to use: HF folder, hub id or .gguf")
  q.add_argument("--out", required=True)
  q.add_argument("--eval-fraction", type=float, default=0.02, help="clauses held out by id hash (split eval)")
  q.add_argument("--heldout-specs", default="", help="specs held out whole (split eval_spec): 38.101-1,23.502")
  q.add_argument("--heldout-spec-fraction", type=float, default=0.0,
                 help="also hold out whole the specs whose number hashes below this fraction")
  q.add_argument("--overwrite", action="store_true")
  q.set_defaults(fn=prepare)
  # inspect's arguments are the trainer's (parsed in `inspect`): listed here for --help only
  sub.add_parser("inspect", help="print a few batches of a config's training data", usage=INSPECT_USAGE,
                 add_help=False)
  g = sub.add_parser("synthetic", help="write the generated telecom-style corpus (quickstart, tests)")
  g.add_argument("--out", default="runs/corpus")
  g.add_argument("--train-docs", type=int, default=2000)
  g.add_argument("--eval-docs", type=int, default=100)
  g.add_argument("--seed", type=int, default=0)
  g.set_defaults(fn=synthetic)
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["inspect"]:
    return inspect(argv[1:])
  args = p.parse_args(argv)
  args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
