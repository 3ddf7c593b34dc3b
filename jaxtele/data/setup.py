"""Datasets of a run config: the training stream and each evaluation set."""

import copy

from jaxtele.data import pipeline
from jaxtele.data.tokenize import DocTokenizer


def doc_tokenizer(cfg, tokenizer, vocab_size: int) -> DocTokenizer:
  return DocTokenizer(tokenizer, vocab_size, cfg.data.doc_end_token)


def train_data(cfg, doc_tok, process_index=0, process_count=1, log=lambda msg: None, seed=None):
  """The training stream (shuffled with `seed`, default `data.seed`); reports how many records each
  source holds and what it left out."""
  dcfg = cfg.data
  if seed is not None and seed != dcfg.seed:
    dcfg = copy.deepcopy(dcfg)
    dcfg.seed = seed
  sources, weights, dropped = pipeline.open_sources(dcfg)
  counts = ", ".join(f"{len(s):,}" for s in sources)
  left_out = ", ".join(f"{n:,} {why}" for why, n in sorted(dropped.items())) or "nothing"
  log(f"data: {len(sources)} source(s) with {counts} records (weights {weights}); left out: {left_out}")
  return pipeline.build(dcfg, doc_tok, sources=sources, weights=weights, process_index=process_index,
                        process_count=process_count)


def resume_stream(cfg, saved: dict | None, step: int | None, log) -> tuple[int, bool]:
  """(the training stream's seed, whether to restore its iterator state from the checkpoint).

  Grain keeps one iterator state per process, so the data position carries over only to the same
  process count. On another count the model and optimizer still resume exactly, and the stream
  restarts in a new order (seed + step) rather than replaying the epoch from its first batch.
  """
  import jax

  if saved is None:
    return cfg.data.seed, False
  seed = saved.get("data_seed", cfg.data.seed)
  if saved.get("process_count", jax.process_count()) == jax.process_count():
    return seed, True
  log(f"warning: step {step} was saved by {saved['process_count']} process(es) and this run has "
      f"{jax.process_count()}: parameters and optimizer state resume exactly; the data stream restarts in a new "
      f"order (seed {seed + step}), so documents already seen this epoch may come again")
  return seed + step, False


def eval_data(cfg, doc_tok, process_index=0, process_count=1) -> dict:
  """{name: dataset} for a run's `eval.sets` (what the trainer evaluates, and `python -m jaxtele.eval` again)."""
  return packed_sets(cfg.eval.sets, cfg.data, cfg.eval.batch_size, doc_tok, process_index=process_index,
                     process_count=process_count)


def packed_sets(specs, data_cfg, batch_size: int, doc_tok, open_source=None, where="eval.sets", process_index=0,
                process_count=1) -> dict:
  """{name: dataset of packed batches} for `{name, sources, format}` specs: every record once, in order, the last
  batch padded. The one builder of packed evaluation sets: the trainer's `eval.sets` and the eval CLI's.
  `open_source(spec, where)` opens a source (default: as the training stream opens its sources)."""
  out = {}
  for i, spec in enumerate(specs):
    dcfg = copy.deepcopy(data_cfg)
    dcfg.unlock()
    dcfg.sources = list(spec["sources"])
    dcfg.format = spec.get("format", data_cfg.format)
    dcfg.batch_size = batch_size
    dcfg.workers = 0
    sources = weights = None  # None: pipeline.build opens them
    if open_source is not None:
      sources = [open_source(s, f"{where}[{i}].sources[{j}]") for j, s in enumerate(spec["sources"])]
      weights = [float(s.get("weight", 1.0)) for s in spec["sources"]]
    out[spec.get("name", f"set{i}")] = pipeline.build(dcfg, doc_tok, sources=sources, weights=weights,
                                                      process_index=process_index, process_count=process_count,
                                                      train=False)
  return out


def data_for(cfg, log=print):
  """(tokenizer, training dataset) of a config, for inspection."""
  from jaxtele.build import load_tokenizer, model_config

  tokenizer = load_tokenizer(cfg.model)
  return tokenizer, train_data(cfg, doc_tokenizer(cfg, tokenizer, model_config(cfg.model).vocab_size), log=log)
