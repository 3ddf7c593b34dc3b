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


def eval_data(cfg, doc_tok, process_index=0, process_count=1) -> dict:
  """{name: dataset} for `eval.sets`: every record once, in order, last batch padded."""
  out = {}
  for i, spec in enumerate(cfg.eval.sets):
    dcfg = copy.deepcopy(cfg.data)
    dcfg.unlock()
    dcfg.sources = list(spec["sources"])
    dcfg.format = spec.get("format", cfg.data.format)
    dcfg.batch_size = cfg.eval.batch_size
    dcfg.workers = 0
    out[spec.get("name", f"set{i}")] = pipeline.build(dcfg, doc_tok, process_index=process_index,
                                                      process_count=process_count, train=False)
  return out


def data_for(cfg, log=print):
  """(tokenizer, training dataset) of a config, for inspection."""
  from jaxtele.build import load_tokenizer, model_config

  tokenizer = load_tokenizer(cfg.model)
  return tokenizer, train_data(cfg, doc_tokenizer(cfg, tokenizer, model_config(cfg.model).vocab_size), log=log)
