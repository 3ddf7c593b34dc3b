"""The evaluation config: ml_collections defaults (locked: a recipe or `--config.k=v` may change values, never
add keys), loaded from `configs/eval/*.py` by `jaxtele.config.load_config`."""

import ml_collections
from ml_collections import FieldReference

from jaxtele.data.pipeline import default_config as data_defaults
from jaxtele.errors import JaxteleError
from jaxtele.eval.mcq import DEFAULT_TEMPLATE as MCQ_TEMPLATE, LETTER_TEMPLATE


def default_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({
      "model": {
          "source": "",  # any model source (jaxtele/source.py): run directory, PEFT adapter, HF / jaxtele folder,
          # hub id or .gguf (--model overrides)
          "step": FieldReference(None, field_type=int),  # run directories: a checkpoint step (None: latest)
          "base": "",  # PEFT adapters: the base model (empty: the adapter's base_model_name_or_path)
          "param_dtype": "float32",
          "dtype": "float32",
      },
      "data_root": "",  # replaces "{data_root}" in every set's paths
      "out": "runs/eval",  # results.json, results.md, predictions/ (--out overrides)
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # perplexity sets are sharded like the trainer's
      # Packed text, as `eval.sets` in a training config: [{name, sources: [...], format, sample}]. A `3gpp`
      # source ({type: 3gpp, path, eval_fraction}) reads held-out clauses straight from the Markdown specs; a
      # `wikitext` source ({type: wikitext, path}) gives one document per article. Every document is scored
      # (`sample`: a stable fraction of the documents, e.g. 0.25 on CPU, for sets without their own `sample`;
      # the fraction scored is reported), and per-document rows go to predictions/ppl_<set>.jsonl.
      # max_batches > 0: about that many batches' worth of whole documents, in a stable random order (reported).
      "perplexity": {"sets": (), "run_sets": True,  # run_sets: a run's own eval.sets, with its data settings
                     "seq_len": 1024, "batch_size": 8, "max_batches": 0, "sample": 1.0, "bits_per_byte": True,
                     "data": data_defaults()},
      # [{name, path, format: teleqna|mcq, categories: [...], limit, seed, style: cloze|letter, template}]
      # limit > 0 caps every set's items (a quick run); a set's own `limit` applies otherwise. style: options
      # scored as continuations (cloze) or listed A-E with the letter scored (letter); a set's own style and
      # template override `style` and `template` (cloze) / `letter_template` (letter), e.g. "tokenizer".
      "mcq": {"sets": (), "template": MCQ_TEMPLATE, "batch_size": 8, "limit": 0, "style": "cloze",
              "letter_template": LETTER_TEMPLATE},
      # [{name, path, format: teleqna|qa, categories, limit, seed, answer_field: option|explanation|...,
      #   answer_ppl, generate (a set's own switches, default on)}]
      "open_qa": {"sets": (), "template": "",  # empty: the template the model was trained with
                  "answer_ppl": True, "score_end_token": True, "generate": True, "batch_size": 8, "limit": 0},
      "generation": {"max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": ()},
      # General-text perplexity of `base` against the evaluated model on the named perplexity sets.
      "forgetting": {"base": "", "sets": ()},
      # n-gram overlap of every MCQ / open-QA item (question + answer) with the training corpus (files or
      # folders); flagged items are reported, and metrics given on all items and on the clean ones.
      "contamination": {"corpus": (), "n": 13, "threshold": 0.5, "cache": ""},  # cache: "" = out/ngram_index.npz
  })
  cfg.lock()
  return cfg


def expand_paths(value, data_root: str):
  """A set spec with "{data_root}" in its paths replaced (nested lists and dicts included)."""
  if isinstance(value, str):
    return value.replace("{data_root}", data_root)
  if isinstance(value, (list, tuple)):
    return [expand_paths(v, data_root) for v in value]
  if isinstance(value, dict) or hasattr(value, "items"):
    return {k: expand_paths(v, data_root) for k, v in value.items()}
  return value


def validate(cfg):
  for key in ("perplexity.batch_size", "perplexity.seq_len", "mcq.batch_size", "open_qa.batch_size",
              "generation.max_new_tokens"):
    node, leaf = key.split(".")
    if cfg[node][leaf] <= 0:
      raise JaxteleError(f"config: {key}: must be positive, got {cfg[node][leaf]}")
  if not 0 < cfg.perplexity.sample <= 1:
    raise JaxteleError(f"config: perplexity.sample: the fraction of documents scored must be in (0, 1], got "
                       f"{cfg.perplexity.sample}")
  if cfg.generation.temperature < 0 or not 0 < cfg.generation.top_p <= 1:
    raise JaxteleError("config: generation: temperature must be >= 0 and top_p in (0, 1]")
  if any("{data_root}" in str(s) for s in (cfg.perplexity.sets, cfg.mcq.sets, cfg.open_qa.sets)) \
      and not cfg.data_root:
    raise JaxteleError("config: data_root: the sets' paths use {data_root} but it is empty")
  names = [s.get("name", f"set{i}") for i, s in enumerate(cfg.perplexity.sets)]
  for name in cfg.forgetting.sets:
    if name not in names and not cfg.perplexity.run_sets:
      raise JaxteleError(f"config: forgetting.sets: {name!r} is not a perplexity set ({', '.join(names) or 'none'})")
  if cfg.forgetting.base and not cfg.forgetting.sets:
    raise JaxteleError("config: forgetting.sets: name the general-text perplexity sets to compare the base on")
  from jaxtele.eval import prompts

  prompts.check(cfg.mcq.template, "mcq.template")
  if cfg.open_qa.template:
    prompts.check(cfg.open_qa.template, "open_qa.template")
  c = cfg.contamination
  if c.corpus and (c.n < 1 or not 0 < c.threshold <= 1):
    raise JaxteleError(f"config: contamination: n must be >= 1 and threshold in (0, 1], got {c.n}, {c.threshold}")
  if not cfg.model.source:
    raise JaxteleError("config: model.source: no model to evaluate (pass --model SOURCE)")
