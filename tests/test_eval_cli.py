"""`python -m jaxtele.eval` end to end: on a tiny run directory (its numbers agree with the trainer's own eval) and
on the SmolLM2 GGUF with a few items; bad input ends in one `error:` line."""

import json
import os

import pytest

from jaxtele.eval.__main__ import main

CONFIG = '''
from jaxtele.eval.config import default_config

def get_config():
  cfg = default_config()
  cfg.perplexity.update(seq_len=64, batch_size=8)
  cfg.perplexity.data.num_packing_bins = 4  # as the tiny recipe packs
  cfg.perplexity.sets = [{"name": "again", "sources": [{"type": "jsonl", "path": "runs/corpus/eval.jsonl"}]}]
  cfg.mcq.sets = [{"name": "toy", "path": "mcq.jsonl", "format": "mcq"}]
  cfg.open_qa.sets = [{"name": "toyqa", "path": "qa.jsonl", "format": "qa"}]
  cfg.generation.update(max_new_tokens=6)
  cfg.contamination.update(corpus=["runs/corpus/train.jsonl"], n=8)
  return cfg
'''


def write_inputs(folder):
  (folder / "eval_cfg.py").write_text(CONFIG)
  mcq = [{"question": "Which timer?", "options": ["T3511", "T3512", "PCF"], "answer": 0, "category": "timers"},
         {"question": "Which function sets policy?", "options": ["UPF", "PCF"], "answer": "PCF", "category": "nf"}]
  # A question copied from a training document, punctuation and case changed: the contamination check flags it.
  first_doc = json.loads(open(folder / "runs" / "corpus" / "train.jsonl").readline())["text"]
  copied = " ".join(first_doc.split()[:14]).upper().replace(".", " ;")
  mcq.append({"question": copied, "options": ["yes", "no"], "answer": 0, "category": "copied"})
  (folder / "mcq.jsonl").write_text("\n".join(json.dumps(r) for r in mcq) + "\n")
  qa = [{"question": "Which function provides policy rules?", "answer": "The PCF"},
        {"question": "Which timer does the UE start?", "answer": "T3511"}]
  (folder / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")


def test_cli_on_a_tiny_run_directory(tiny, workdir, capsys):
  from jaxtele.train import run

  trained = run(tiny("--config.eval.max_batches=0"))  # the trainer's eval over its whole set
  write_inputs(workdir)
  main(["--config", "eval_cfg.py", "--model", str(workdir / "run"), "--out", str(workdir / "ev")])
  res = json.load(open(workdir / "ev" / "results.json"))
  assert os.path.getsize(workdir / "ev" / "results.md") > 100
  assert res["model"]["kind"] == "run" and res["model"]["step"] == 6
  # The run's own eval set, built as the trainer builds it: the trainer's final numbers, same checkpoint.
  assert res["perplexity"]["run/telecom"]["ppl"] == pytest.approx(trained["eval"]["eval/telecom/ppl"], rel=1e-5)
  assert res["perplexity"]["run/telecom"]["tokens"] == trained["eval"]["eval/telecom/tokens"]
  assert res["perplexity"]["run/telecom"]["fraction_scored"] == 1.0  # the trainer here scored its whole set
  # The same file as a configured set, scored document by document: the same pieces, so the same numbers.
  again = res["perplexity"]["again"]
  assert again["ppl"] == pytest.approx(res["perplexity"]["run/telecom"]["ppl"], rel=1e-5)
  assert again["tokens"] == again["tokens_total"] == trained["eval"]["eval/telecom/tokens"]
  docs = [json.loads(line) for line in open(workdir / "ev" / "predictions" / "ppl_again.jsonl")]
  assert len(docs) == again["documents"] == again["documents_total"] == len(open("runs/corpus/eval.jsonl").readlines())
  assert set(docs[0]) == {"id", "nll", "tokens", "bytes", "spec", "content"}
  assert sum(d["tokens"] for d in docs) == again["tokens"]
  assert 0 < res["perplexity"]["run/telecom"]["bpb"] < 8
  assert res["mcq"]["toy"]["raw"]["items"] == 3
  assert set(res["mcq"]["toy"]["per_category"]) == {"timers", "nf", "copied"}
  flagged = [json.loads(line)["contaminated"] for line in open(workdir / "ev" / "predictions" / "mcq_toy.jsonl")]
  assert flagged == [False, False, True]  # only the copy
  c = res["mcq"]["toy"]["contamination"]["raw"]
  assert (c["n_all"], c["n_clean"], c["n_flagged"]) == (3, 2, 1)
  assert "## Contamination" in open(workdir / "ev" / "results.md").read()
  qa = res["open_qa"]["toyqa"]
  # The run trained on plain text: no instruction template, so it is prompted as its base would be.
  assert qa["template"] == "alpaca" and "no training template" in qa["template_origin"]
  assert 0 <= qa["generation"]["f1"] <= 1 and qa["answer_ppl"]["items"] == 2
  assert len(open(workdir / "ev" / "predictions" / "qa_toyqa.jsonl").readlines()) == 2
  assert "items/s" in capsys.readouterr().err  # progress lines


def test_cli_bad_template_is_one_error_line(tiny, workdir, capsys):
  write_inputs(workdir)
  with pytest.raises(SystemExit) as e:
    main(["--config", "eval_cfg.py", "--model", "x.gguf", "--config.open_qa.template=Answer:"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.count("\n") == 0 and "has no {question} slot" in err


@pytest.mark.parametrize("args,message", [
    (["--config.mcq.limit=-1"], "config: mcq.limit: must be >= 0, got -1"),
    (["--config.mcq.nope=1"], "config: unknown key 'mcq.nope'"),
    (["--config.generation.max_new_tokens=many"], "config: generation.max_new_tokens: cannot parse 'many'"),
    (["--config.perplexity.sample=1.5"], "config: perplexity.sample: must be <= 1.0, got 1.5 (allowed: (0.0, 1.0])"),
    (["--", "--config.mcq.style=letters"], "config: mcq.style: 'letters' is not one of cloze, letter"),
    (["--modle", "x.gguf"], "unknown argument '--modle' (usage: --config FILE [--model SOURCE] [--out DIR]"),
])
def test_cli_bad_keys_are_one_error_line_naming_the_key(workdir, capsys, args, message):
  write_inputs(workdir)
  with pytest.raises(SystemExit) as e:
    main(["--config", "eval_cfg.py", "--model", "x.gguf", *args])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.count("\n") == 0 and err.startswith(f"error: {message}"), err


@pytest.mark.slow
def test_cli_on_the_gguf(shared_data, tmp_path, capsys):
  from jaxtele.convert import smollm2_gguf_path

  gguf = smollm2_gguf_path()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  main(["--config", os.path.join(root, "configs", "eval", "telecom.py"), "--model", gguf, "--out", str(tmp_path),
        f"--config.data_root={shared_data}", "--config.perplexity.seq_len=128", "--config.perplexity.max_batches=1",
        "--config.mcq.limit=2", "--config.open_qa.limit=2", "--config.generation.max_new_tokens=8",
        f"--config.forgetting.base={gguf}"])
  res = json.load(open(tmp_path / "results.json"))
  assert set(res["perplexity"]) == {"3gpp_heldout", "3gpp_heldout_spec", "wikitext2"}
  assert 5 < res["perplexity"]["wikitext2"]["ppl"] < 200
  # max_batches=1: about one batch of whole documents, and the page says how little of each set that is
  held, wiki = res["perplexity"]["3gpp_heldout"], res["perplexity"]["wikitext2"]
  spec = res["perplexity"]["3gpp_heldout_spec"]
  assert (held["documents_total"], wiki["documents_total"]) == (197, 62)  # prepare's eval split; ` = Title = ` lines
  # Whole specs at fraction 0.1: TS 23.502, 38.211, 38.214, the clauses `prepare --heldout-spec-fraction 0.1` puts
  # in eval_spec; none of them is also in the clause-held-out set.
  assert spec["documents_total"] == 1428 and set(spec["by_spec"]) <= {"TS 23.502", "TS 38.211", "TS 38.214"}
  for r in (held, wiki, spec):
    assert r["documents"] >= 1 and r["fraction_scored"] == pytest.approx(r["tokens"] / r["tokens_total"])
    assert r["fraction_scored"] < 0.05
  assert res["mcq"]["teleqna_standards"]["raw"]["items"] == 2
  assert res["open_qa"]["teleqna_standards_open"]["template"] == "tokenizer"  # GGUF: its own chat template
  f = res["forgetting"]["sets"]["wikitext2"]
  assert f["base_ppl"] == pytest.approx(f["tuned_ppl"], rel=1e-6)  # the same model on both sides
  assert "Forgetting" in (tmp_path / "results.md").read_text()
