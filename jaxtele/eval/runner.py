"""`python -m jaxtele.eval`: one model (any source: a run's checkpoint, a PEFT adapter, an HF / jaxtele folder, a GGUF) through the configured
tasks: perplexity and bits per byte, multiple choice, open questions (answer perplexity, generation + token F1),
and forgetting against a base model. Results go to `out/results.json`, `out/results.md`, `out/predictions/`."""

import os
import time

import jax
import numpy as np

from jaxtele.data import setup as data_setup
from jaxtele.errors import JaxteleError
from jaxtele.eval import answers, contamination, documents, items as eval_items, mcq, prompts, results_page, text_sets
from jaxtele.eval.config import expand_paths, validate
from jaxtele.generation import Sampling
from jaxtele.evaluate import evaluate, scored_bytes
from jaxtele.metrics import eval_key
from jaxtele.progress import Progress, log
from jaxtele.sharding import Shardings, make_mesh, mesh_shape
from jaxtele.source import Flags, Loaded, load as load_source, resolve
from jaxtele.step import make_eval_step, make_token_nll_step

EVAL_FLAGS = Flags("model.source", "model.step", "model.base")


def load(source: str, step=None, runtime=None, base=None, flags: Flags = EVAL_FLAGS) -> Loaded:
  """Any model source (source.py): a run directory at `step`, a PEFT adapter on `base`, a pretrained model."""
  return load_source(resolve(source, step, base, flags), runtime, flags)


def perplexity_sets(cfg, m: Loaded, doc_tok) -> dict:
  """{name: (dataset, batch_size, seq_len, max_batches)}: a run's own eval sets (exactly as its trainer built
  them), then the configured ones."""
  out = {}
  if cfg.perplexity.run_sets and m.run_cfg is not None and m.run_cfg.eval.sets:
    rc = m.run_cfg
    for name, ds in data_setup.eval_data(rc, doc_tok).items():  # "run/...": never shadowed by a configured set
      out[f"run/{name}"] = (ds, rc.eval.batch_size, rc.data.seq_len, rc.eval.max_batches)
  pc = cfg.perplexity
  data_cfg = pc.data.copy_and_resolve_references()
  data_cfg.unlock()
  data_cfg.seq_len = pc.seq_len
  for name, ds in text_sets.build_doc_sets(pc.sets, data_cfg, pc.batch_size, doc_tok, pc.sample,
                                                 pc.max_batches).items():
    out[name] = (ds, pc.batch_size, pc.seq_len, 0)  # scored per document (documents.py), whole documents
  return out


def perplexities(m: Loaded, sets: dict, names, mesh, tokenizer, bits_per_byte: bool, records=None) -> dict:
  """{name: result}; `records`, when given, receives {name: per-document records} of the document sets."""
  eval_step = jax.jit(make_eval_step(m.graphdef))
  nll_step = jax.jit(make_token_nll_step(m.graphdef))
  mc = m.model.config
  rules = Shardings(mesh, mc.num_heads, mc.num_kv_heads)
  params = jax.device_put(m.params, rules.tree(m.params))
  frozen = jax.device_put(m.frozen, rules.tree(m.frozen))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for name in names:
    ds, batch, seq_len, max_batches = sets[name]
    if batch % shards:
      raise JaxteleError(f"config: perplexity set {name!r}: batch size {batch} is not divisible by the mesh's "
                         f"batch shards ({shards})")
    prog = Progress(f"perplexity {name}", max_batches or None, "batches")
    if isinstance(ds, documents.DocSet):
      out[name], recs = documents.results(ds, documents.score(nll_step, params, frozen, ds, mesh, max_batches,
                                                              prog))
      if not bits_per_byte:
        out[name].pop("bpb")
      if records is not None:
        records[name] = recs
      continue
    r = evaluate(eval_step, params, frozen, {name: ds}, mesh, max_batches, (batch, seq_len),
                 byte_count=scored_bytes(tokenizer) if bits_per_byte else None, progress=lambda _, done: prog(done))
    if r[eval_key(name, "tokens")] == 0:
      raise JaxteleError(f"perplexity set {name!r}: an empty evaluation set (no scored tokens)")
    out[name] = {k.removeprefix(eval_key(name, "")): v for k, v in r.items()}
    # A run's set is scored as its trainer scores it (eval.max_batches included): say how much of it that was.
    total = float(sum(np.asarray(b["loss_mask"]).sum() for b in ds)) if max_batches else out[name]["tokens"]
    out[name] |= {"tokens_total": total, "fraction_scored": out[name]["tokens"] / max(total, 1.0)}
  return out


def run(cfg) -> dict:
  validate(cfg)
  cfg = cfg.copy_and_resolve_references()
  for task in ("perplexity", "mcq", "open_qa"):
    cfg[task].sets = expand_paths(list(cfg[task].sets), cfg.data_root)
    if task != "perplexity" and cfg[task].limit > 0:
      cfg[task].sets = [{**s, "limit": cfg[task].limit} for s in cfg[task].sets]
  t0 = time.time()
  m = load(cfg.model.source, cfg.model.step, {"param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype},
           cfg.model.base or None)
  if m.tokenizer is None:
    raise JaxteleError(f"{cfg.model.source}: the model has no tokenizer; evaluation needs one")
  vocab = m.model.config.vocab_size
  doc_tok = data_setup.doc_tokenizer(m.run_cfg or cfg.perplexity, m.tokenizer, vocab)
  mesh = make_mesh(cfg.mesh)
  mesh_shape(cfg.mesh, jax.device_count())
  results = {"model": {"source": m.source, "kind": m.kind, "step": m.step}, "config": cfg.to_dict()}
  preds = os.path.join(cfg.out, "predictions")

  sets = perplexity_sets(cfg, m, doc_tok)
  if sets:
    log(f"perplexity on {', '.join(sets)}")
    per_doc = {}
    results["perplexity"] = perplexities(m, sets, list(sets), mesh, m.tokenizer, cfg.perplexity.bits_per_byte,
                                         per_doc)
    for name, recs in per_doc.items():  # one row per document: what paired comparisons resample
      results_page.write_jsonl(os.path.join(preds, f"ppl_{name}.jsonl"), recs)

  index = None
  if cfg.contamination.corpus:
    corpus = expand_paths(list(cfg.contamination.corpus), cfg.data_root)
    cache = cfg.contamination.cache or os.path.join(cfg.out, "ngram_index.npz")
    index = contamination.cached_index(corpus, cache, cfg.contamination.n, log=log)
    results["contamination"] = {"corpus": corpus, "n": cfg.contamination.n,
                                "threshold": cfg.contamination.threshold}

  def flags(its, texts):
    return contamination.flag_items(index, texts, cfg.contamination.threshold) if index else [False] * len(its)

  for i, spec in enumerate(cfg.mcq.sets):
    name, where = spec.get("name", f"mcq{i}"), f"mcq.sets[{i}]"
    style, template = mcq.set_style(spec, cfg.mcq, where)
    its = eval_items.load_items(spec, "mcq", where)
    total = sum(len(it["options"]) for it in its) if style == "cloze" else len(its)
    summary, records = mcq.evaluate(m.model, doc_tok, its, template, cfg.mcq.batch_size,
                                    Progress(f"mcq {name}", total, "options" if style == "cloze" else "items"),
                                    style)
    summary["template"] = template
    if index:
      flagged = flags(its, [it["question"] + " " + it["options"][it["answer"]] for it in its])
      for r, f in zip(records, flagged, strict=True):
        r["contaminated"] = f
      summary["contamination"] = {
          "raw": contamination.split_metrics([r["pred"] == r["answer"] for r in records], flagged),
          "norm": contamination.split_metrics([r["pred_norm"] == r["answer"] for r in records], flagged)}
    results.setdefault("mcq", {})[name] = summary
    results_page.write_jsonl(os.path.join(preds, f"mcq_{name}.jsonl"), records)

  if cfg.open_qa.sets:
    template, origin = prompts.resolve(cfg.open_qa.template, cfg.model.source, m.run_cfg, m.tokenizer,
                                       "open_qa.template")
    g = cfg.generation
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p, g.seed, (), tuple(g.stop))
  for i, spec in enumerate(cfg.open_qa.sets):
    name, where = spec.get("name", f"qa{i}"), f"open_qa.sets[{i}]"
    its = eval_items.load_items(spec, "qa", where)
    r = {"template": template, "template_origin": origin, "items": len(its)}
    if "answer_field" in spec:
      r["answer_field"] = spec["answer_field"]
    if cfg.open_qa.answer_ppl and spec.get("answer_ppl", True):  # a set may turn either task off
      r["answer_ppl"] = answers.answer_perplexity(m.model, doc_tok, its, template, cfg.open_qa.batch_size,
                                                  cfg.open_qa.score_end_token,
                                                  Progress(f"answer ppl {name}", len(its)))
    if cfg.open_qa.generate and spec.get("generate", True):
      r["generation"], records = answers.generated_answers(m.model, doc_tok, its, template, sampling,
                                                           cfg.open_qa.batch_size,
                                                           Progress(f"generate {name}", len(its)))
      if index:
        flagged = flags(its, [it["question"] + " " + it["references"][0] for it in its])
        for rec, f in zip(records, flagged, strict=True):
          rec["contaminated"] = f
        r["contamination"] = {"f1": contamination.split_metrics([x["f1"] for x in records], flagged)}
      results_page.write_jsonl(os.path.join(preds, f"qa_{name}.jsonl"), records)
    results.setdefault("open_qa", {})[name] = r

  if cfg.forgetting.base:
    results["forgetting"] = forgetting(cfg, m, sets, results.get("perplexity", {}), mesh)
  results["seconds"] = time.time() - t0
  results_page.write(cfg.out, results)
  log(f"wrote {os.path.join(cfg.out, 'results.json')} and results.md")
  return results


def forgetting(cfg, m: Loaded, sets: dict, tuned: dict, mesh) -> dict:
  """Base vs evaluated model on the same general-text batches (the evaluated model's tokenization)."""
  names = list(cfg.forgetting.sets)
  missing = [n for n in names if n not in sets]
  if missing:
    raise JaxteleError(f"config: forgetting.sets: {missing[0]!r} is not a perplexity set ({', '.join(sets)})")
  base = load(cfg.forgetting.base, None, {"param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype},
              flags=Flags("forgetting.base", "forgetting.step", "forgetting.base"))
  if base.model.config.vocab_size != m.model.config.vocab_size:
    raise JaxteleError(f"forgetting.base: {cfg.forgetting.base} has vocab {base.model.config.vocab_size}, the "
                       f"evaluated model {m.model.config.vocab_size}: not comparable token for token")
  log(f"forgetting: base {cfg.forgetting.base} on {', '.join(names)}")
  base_ppl = perplexities(base, sets, names, mesh, m.tokenizer, cfg.perplexity.bits_per_byte)
  out = {}
  for n in names:
    b, t = base_ppl[n], tuned[n]
    out[n] = {"base_ppl": b["ppl"], "tuned_ppl": t["ppl"], "delta": t["ppl"] - b["ppl"], "ratio": t["ppl"] / b["ppl"],
              "base_loss": b["loss"], "tuned_loss": t["loss"], "tokens": t["tokens"],
              "fraction_scored": t.get("fraction_scored")}
    if "bpb" in b:
      out[n] |= {"base_bpb": b["bpb"], "tuned_bpb": t["bpb"]}
  return {"base": cfg.forgetting.base, "sets": out}

