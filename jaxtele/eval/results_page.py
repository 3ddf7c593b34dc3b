"""One evaluation's results page: `results.json` (everything), `results.md` (tables) and the per-item predictions
(`write_jsonl`). Comparing runs is `jaxtele.run_report`'s job."""

import json
import os


def write_jsonl(path: str, records: list):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _ci(acc: dict) -> str:
  lo, hi = acc["ci95"]
  return f"{acc['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _scored(ap: dict) -> str:
  """What the answer perplexity scored: answer tokens only, or with the closing end token (and how many)."""
  if not ap.get("score_end_token"):
    return f"{ap['tokens']} answer tokens only (end token not scored)"
  return f"{ap['tokens']} tokens: the answers and their end token ({ap.get('end_tokens', ap['items'])} of them)"


def breakdown_tables(perplexity: dict) -> list[str]:
  """Bits per byte of each set by spec, series and content type (sets scored per document)."""
  lines = []
  for name, r in perplexity.items():
    for key, title in (("by_series", "series"), ("by_content", "content"), ("by_spec", "spec")):
      if r.get(key):
        lines += ["", f"{name} by {title}:", "", f"| {title} | documents | tokens | bits/byte | ppl |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g} | {b['documents']:,} | {b['tokens']:,} | {b['bpb']:.4f} | {b['ppl']:.3f} |"
                  for g, b in r[key].items()]
  return lines


def markdown(results: dict) -> str:
  m = results["model"]
  lines = [f"# Evaluation of `{m['source']}`", "", f"{m['kind']}" + (f", step {m['step']}" if m.get("step") else "")]
  if results.get("perplexity"):
    lines += ["", "## Perplexity", "", "| set | ppl | bits/byte | tokens | scored of the set |",
              "|---|---|---|---|---|"]
    for name, r in results["perplexity"].items():
      bpb = f"{r['bpb']:.4f}" if "bpb" in r else "-"
      scored = f"{r['fraction_scored']:.1%} of {int(r['tokens_total']):,} tokens" if "tokens_total" in r else "-"
      if "documents_total" in r:
        scored += f", {r['documents']:,} of {r['documents_total']:,} documents"
      lines.append(f"| {name} | {r['ppl']:.3f} | {bpb} | {int(r['tokens']):,} | {scored} |")
    lines += breakdown_tables(results["perplexity"])
  if results.get("mcq"):
    lines += ["", "## Multiple choice (accuracy, 95% Wilson interval; baselines on the same items)", "",
              "| set | style | slice | items | raw | length-normalised | chance | longest option | shortest option "
              "| best fixed letter | most picked |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["mcq"].items():
      slices = [("all", r)] + [(f"category: {k}", v) for k, v in r["per_category"].items()]
      slices += [(f"tag: {k}", v) for k, v in r.get("per_tag", {}).items() if len(r["per_tag"]) > 1]
      for label, c in slices:
        base = c.get("baselines", {})
        cells = [_ci(base[k]) if k in base else "-" for k in ("chance", "longest", "shortest")]
        fixed, picked = base.get("fixed_position"), c.get("most_picked")
        cells.append(f"{fixed['position']}: {_ci(fixed)}" if fixed and fixed["position"] else "-")
        cells.append(f"{picked['position']} for {picked['fraction']:.0%}" if picked and picked["position"] else "-")
        norm = _ci(c["norm"]) if r.get("style", "cloze") == "cloze" else "-"  # letters: nothing to normalise
        lines.append(f"| {name} | {r.get('style', 'cloze')} | {label} | {c['raw']['items']} | {_ci(c['raw'])} | "
                     f"{norm} | " + " | ".join(cells) + " |")
  if results.get("contamination"):
    c = results["contamination"]
    lines += ["", f"## Contamination ({c['n']}-gram overlap >= {c['threshold']} with {', '.join(c['corpus'])})", "",
              "| set | metric | flagged items | all items | clean items |", "|---|---|---|---|---|"]
    for task in ("mcq", "open_qa"):
      for name, r in results.get(task, {}).items():
        for metric, s in r.get("contamination", {}).items():
          lines.append(f"| {name} | {metric} | {s['n_flagged']} | {s['all']:.3f} ({s['n_all']}) | "
                       f"{s['clean']:.3f} ({s['n_clean']}) |")
  if results.get("open_qa"):
    lines += ["", "## Open questions", "",
              "| set | template | answer ppl | answer bits/byte | token F1 | exact match |",
              "|---|---|---|---|---|---|"]
    for name, r in results["open_qa"].items():
      ap, gen = r.get("answer_ppl", {}), r.get("generation", {})
      cells = [f"{ap['ppl']:.3f}" if ap else "-", f"{ap['bpb']:.4f}" if ap else "-",
               f"{gen['f1']:.3f}" if gen else "-", f"{gen['exact_match']:.3f}" if gen else "-"]
      lines.append(f"| {name} | `{r['template']!r}` | " + " | ".join(cells) + " |")
    for name, r in results["open_qa"].items():
      if r.get("answer_ppl"):
        lines += ["", f"{name}: answer perplexity over {_scored(r['answer_ppl'])}."]
  if results.get("forgetting"):
    f = results["forgetting"]
    lines += ["", f"## Forgetting (against `{f['base']}`)", "", "| set | base ppl | tuned ppl | delta | ratio |",
              "|---|---|---|---|---|"]
    for name, r in f["sets"].items():
      lines.append(f"| {name} | {r['base_ppl']:.3f} | {r['tuned_ppl']:.3f} | {r['delta']:+.3f} | {r['ratio']:.3f} |")
  lines += ["", f"{results['seconds']:.1f} s"]
  return "\n".join(lines) + "\n"


def write(out: str, results: dict):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2, ensure_ascii=False, default=str)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(results))
