"""The evaluation config: every key declared once with its default and its rule (jaxtele/schema.py, as the
training config), loaded from `configs/eval/*.py` by `jaxtele.config.load_config`; locked: a recipe or
`--config.k=v` may change values, never add keys. Each bad key is one line: `config: KEY: what is wrong`."""

from jaxtele import schema
from jaxtele.accelerator import DTYPES
from jaxtele.data.pipeline import schema as data_schema
from jaxtele.errors import JaxteleError
from jaxtele.eval.mcq import DEFAULT_TEMPLATE as MCQ_TEMPLATE, LETTER_TEMPLATE, STYLES
from jaxtele.schema import (BOOL, FRACTION, MESH_AXIS, NONNEG, POSITIVE, STR, TUPLE, Rule, choice)


def eval_schema() -> dict:
  """Every evaluation key: `rule(default)`."""
  return {
      "model": {
          "source": STR(""),  # any model source (jaxtele/source.py): run directory, PEFT adapter, HF / jaxtele
          # folder, hub id or .gguf (--model overrides)
          "step": Rule(int, lo=0, optional=True)(None),  # run directories: a checkpoint step (None: latest)
          "base": STR(""),  # PEFT adapters: the base model (empty: the adapter's base_model_name_or_path)
          "param_dtype": choice(*DTYPES)("float32"),
          "dtype": choice(*DTYPES)("float32"),
      },
      "data_root": STR(""),  # replaces "{data_root}" in every set's paths
      "out": STR("runs/eval"),  # results.json, results.md, predictions/ (--out overrides)
      "mesh": {"data": MESH_AXIS(-1), "fsdp": MESH_AXIS(1), "tensor": MESH_AXIS(1)},  # sharded like the trainer's
      # Packed text, as `eval.sets` in a training config: [{name, sources: [...], format, sample}]. A `3gpp`
      # source ({type: 3gpp, path, eval_fraction}) reads held-out clauses straight from the Markdown specs; a
      # `wikitext` source ({type: wikitext, path}) gives one document per article. Every document is scored
      # (`sample`: a stable fraction of the documents, e.g. 0.25 on CPU, for sets without their own `sample`;
      # the fraction scored is reported), and per-document rows go to predictions/ppl_<set>.jsonl.
      # max_batches > 0: about that many batches' worth of whole documents, in a stable random order (reported).
      "perplexity": {"sets": TUPLE(()),
                     "run_sets": BOOL(True),  # a run's own eval.sets, with its data settings
                     "seq_len": POSITIVE(1024), "batch_size": POSITIVE(8), "max_batches": NONNEG(0),
                     "sample": FRACTION(1.0),  # the fraction of documents scored
                     "bits_per_byte": BOOL(True), "data": data_schema()},
      # [{name, path, format: teleqna|mcq, categories: [...], limit, seed, style: cloze|letter, template}]
      # limit > 0 caps every set's items (a quick run); a set's own `limit` applies otherwise. style: options
      # scored as continuations (cloze) or listed A-E with the letter scored (letter); a set's own style and
      # template override `style` and `template` (cloze) / `letter_template` (letter), e.g. "tokenizer".
      "mcq": {"sets": TUPLE(()), "template": STR(MCQ_TEMPLATE), "batch_size": POSITIVE(8), "limit": NONNEG(0),
              "style": choice(*STYLES)("cloze"), "letter_template": STR(LETTER_TEMPLATE)},
      # [{name, path, format: teleqna|qa, categories, limit, seed, answer_field: option|explanation|...,
      #   answer_ppl, generate (a set's own switches, default on)}]
      "open_qa": {"sets": TUPLE(()),
                  "template": STR(""),  # empty: the template the model was trained with
                  "answer_ppl": BOOL(True), "score_end_token": BOOL(True), "generate": BOOL(True),
                  "batch_size": POSITIVE(8), "limit": NONNEG(0)},
      "generation": {"max_new_tokens": POSITIVE(48), "temperature": Rule(float, lo=0.0)(0.0),
                     "top_p": FRACTION(1.0), "seed": NONNEG(0), "stop": TUPLE(())},
      # General-text perplexity of `base` against the evaluated model on the named perplexity sets.
      "forgetting": {"base": STR(""), "sets": TUPLE(())},
      # n-gram overlap of every MCQ / open-QA item (question + answer) with the training corpus (files or
      # folders); flagged items are reported, and metrics given on all items and on the clean ones.
      "contamination": {"corpus": TUPLE(()), "n": POSITIVE(13), "threshold": FRACTION(0.5),
                        "cache": STR("")},  # cache: "" = out/ngram_index.npz
  }


RULES = schema.rules(eval_schema())


def default_config():
  return schema.defaults(eval_schema())


def check_rules(cfg):
  """Every key against its rule (type, range, choices), as the training config's are."""
  schema.check(cfg, RULES)
  schema.check_mesh(cfg.mesh)


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
  """Per-key rules, then what spans keys, once the model to evaluate is known."""
  check_rules(cfg)
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
  if not cfg.model.source:
    raise JaxteleError("config: model.source: no model to evaluate (pass --model SOURCE)")
