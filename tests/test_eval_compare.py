"""Paired comparison of two results folders: McNemar against scipy's exact binomial test, the bootstrap against
synthetic data with a known difference (and the normal-theory interval), and bad input as one error line."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from jaxtele.eval import compare, stats


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 1), (3, 3), (7, 2), (2, 9), (40, 61), (0, 25), (612, 700)])
def test_mcnemar_is_scipys_exact_binomial_on_the_discordant_pairs(only_a, only_b):
  n = only_a + only_b
  want = binomtest(only_a, n, 0.5).pvalue if n else 1.0
  assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_bootstrap_covers_a_known_difference_and_matches_the_normal_interval():
  rng = np.random.default_rng(1)
  n = 400
  # Mean of paired scores (F1 per item): true A - B = 0.08; the normal interval is mean(d) +- 1.96 sd(d)/sqrt(n).
  f1_b = rng.uniform(0, 1, n)
  f1_a = f1_b + 0.08 + rng.normal(0, 0.2, n)
  ones = np.ones(n)
  r = stats.paired_bootstrap(f1_a, ones, f1_b, ones, samples=4000, seed=0)
  d = f1_a - f1_b
  half = 1.96 * d.std(ddof=1) / math.sqrt(n)
  assert r["diff"] == pytest.approx(d.mean(), abs=1e-12)
  assert r["ci"] == pytest.approx([d.mean() - half, d.mean() + half], abs=0.15 * half)
  assert r["ci"][0] < 0.08 < r["ci"][1] and r["distinguishable"]
  # Corpus bits per byte from documents of unequal length: A is 0.05 bit/byte better on every document.
  nbytes = rng.integers(200, 5000, n).astype(float)
  bpb_b = rng.uniform(0.8, 1.6, n)
  nll_b = bpb_b * nbytes * math.log(2)
  nll_a = (bpb_b - 0.05 + rng.normal(0, 0.1, n)) * nbytes * math.log(2)
  r = stats.paired_bootstrap(nll_a / math.log(2), nbytes, nll_b / math.log(2), nbytes, seed=0)
  assert r["ci"][0] < -0.05 < r["ci"][1] and r["ci"][1] < 0


def write_results(folder, mcq_hits, nll, tokens, nbytes, f1):
  (folder / "predictions").mkdir(parents=True)
  rows = {"mcq_std": [{"id": f"q{i}", "answer": 1, "pred": 1 if h else 0, "pred_norm": 1 if h else 2}
                      for i, h in enumerate(mcq_hits)],
          "ppl_3gpp": [{"id": f"d{i}", "nll": float(x), "tokens": int(t), "bytes": int(b)}
                       for i, (x, t, b) in enumerate(zip(nll, tokens, nbytes, strict=True))],
          "qa_open": [{"id": f"q{i}", "f1": float(x), "em": 0.0} for i, x in enumerate(f1)]}
  for name, rs in rows.items():
    (folder / "predictions" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
  return str(folder)


@pytest.fixture
def two_equal_models(tmp_path):
  """A and B differ item by item but not overall: the same accuracy (swapped hits), the same corpus totals."""
  rng = np.random.default_rng(0)
  n = 120
  hits_a = rng.random(n) < 0.5
  hits_b = hits_a.copy()
  flip = np.flatnonzero(hits_a)[:10], np.flatnonzero(~hits_a)[:10]
  hits_b[flip[0]], hits_b[flip[1]] = False, True  # 10 discordant each way
  tokens = np.repeat(rng.integers(50, 500, n // 2), 2)
  nll_a = tokens * rng.uniform(1.5, 2.5, n)
  nll_b = nll_a + 0.3 * tokens * np.tile([1, -1], n // 2)  # pairs of documents cancel: sums identical
  f1_a = rng.uniform(0, 1, n)
  f1_b = f1_a + np.tile([0.1, -0.1], n // 2)
  a = write_results(tmp_path / "A", hits_a, nll_a, tokens, tokens * 4, f1_a)
  b = write_results(tmp_path / "B", hits_b, nll_b, tokens, tokens * 4, f1_b)
  return a, b


def test_cli_says_not_distinguishable_when_nothing_differs_overall(two_equal_models, tmp_path, capsys):
  a, b = two_equal_models
  assert compare.main([a, b, "--samples", "500", "--out", str(tmp_path / "cmp.json")]) == 0
  table = capsys.readouterr().out
  res = json.load(open(tmp_path / "cmp.json"))
  by = {(r["set"], r["metric"]): r for r in res["rows"]}
  acc = by[("std", "accuracy")]
  assert (acc["only_a"], acc["only_b"]) == (10, 10) and acc["p"] == pytest.approx(binomtest(10, 20).pvalue)
  for key in [("3gpp", "loss (nats/token)"), ("3gpp", "perplexity"), ("3gpp", "bits per byte"), ("open", "token F1")]:
    r = by[key]
    assert abs(r["diff"]) < 1e-9 and r["ci"][0] < 0 < r["ci"][1], key
    assert r["verdict"] == "not distinguishable at 95%"
  assert table.count("not distinguishable at 95%") == len(res["rows"])


def test_cli_finds_a_real_mcq_difference(tmp_path):
  hits_a = np.ones(60, bool)
  hits_b = hits_a.copy()
  hits_b[:15] = False  # 15 discordant pairs, all won by A: p = 2 / 2**15
  ones = np.ones(60)
  a = write_results(tmp_path / "A", hits_a, ones * 100, ones * 50, ones * 200, ones)
  b = write_results(tmp_path / "B", hits_b, ones * 100, ones * 50, ones * 200, ones)
  row = compare.compare(a, b, samples=200)["rows"][0]
  assert row["p"] == pytest.approx(binomtest(15, 15).pvalue) and row["verdict"] == "A better"


def one_error_line(capsys, argv):
  with pytest.raises(SystemExit) as e:
    compare.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
  return err


def test_bad_input_is_one_error_line_and_writes_nothing(two_equal_models, tmp_path, capsys):
  a, b = two_equal_models
  out = tmp_path / "cmp.md"
  assert "no such results folder" in one_error_line(capsys, [a, str(tmp_path / "nowhere"), "--out", str(out)])
  path = tmp_path / "B" / "predictions" / "mcq_std.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:-1]) + "\n")  # B lost an item
  err = one_error_line(capsys, [a, b, "--out", str(out)])
  assert "mcq_std.jsonl: item 'q119' is not in" in err and "not the same set" in err
  path.write_text("\n".join(lines[:-1] + ['{"id": "q119", "answer": 1}']) + "\n")
  assert f"mcq_std.jsonl:{len(lines)}: needs a finite number 'pred'" in one_error_line(capsys, [a, b])
  assert not out.exists()


def test_an_evaluated_run_compares_item_by_item(tiny_run, tmp_path):
  """The runner's own prediction files (letter-style MCQ, open QA) against a copy with answers changed by hand:
  McNemar counts the changed items, F1 gets a bootstrap row over the same items."""
  import shutil

  from jaxtele.config import load_config
  from jaxtele.eval.runner import run

  mcq_items = [{"id": f"m{i}", "question": f"Which timer number {i}?", "options": ["T3511", "T3512", "PCF", "UPF"],
                "answer": i % 4} for i in range(8)]
  (tmp_path / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcq_items))
  qa = [{"id": f"q{i}", "question": f"Which function sets policy {i}?", "answer": "The PCF"} for i in range(3)]
  (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
  cfg_file = tmp_path / "eval_cfg.py"
  cfg_file.write_text(f'''
from jaxtele.eval.config import default_config

def get_config():
  cfg = default_config()
  cfg.perplexity.run_sets = False
  cfg.mcq.sets = [{{"name": "toy_letter", "path": "{tmp_path}/mcq.jsonl", "format": "mcq", "style": "letter"}}]
  cfg.open_qa.sets = [{{"name": "toyqa", "path": "{tmp_path}/qa.jsonl", "format": "qa"}}]
  cfg.generation.update(max_new_tokens=4)
  return cfg
''')
  source = tiny_run("full", "--config.train.mode=full")
  cfg = load_config(str(cfg_file), [f"--config.model.source={source}", f"--config.out={tmp_path / 'A'}"],
                    check=lambda cfg: None)  # the runner validates
  res = run(cfg)
  assert res["mcq"]["toy_letter"]["style"] == "letter"
  assert res["mcq"]["toy_letter"]["template"] == "Question: {question}\n{options}\nAnswer:"
  shutil.copytree(tmp_path / "A", tmp_path / "B")
  path = tmp_path / "B" / "predictions" / "mcq_toy_letter.jsonl"
  rows = [json.loads(x) for x in open(path)]
  hits_a = [r["pred"] == r["answer"] for r in rows]
  for r in rows[:5]:  # B answers the first five right
    r["pred"] = r["answer"]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  gained = sum(not h for h in hits_a[:5])
  result = compare.compare(str(tmp_path / "A"), str(tmp_path / "B"), samples=200)
  by = {(r["set"], r["metric"]): r for r in result["rows"]}
  r = by[("toy_letter", "accuracy")]
  assert (r["only_a"], r["only_b"]) == (0, gained)
  assert r["p"] == pytest.approx(binomtest(0, gained).pvalue if gained else 1.0)
  assert by[("toyqa", "token F1")]["units"] == 3 and by[("toyqa", "token F1")]["diff"] == 0
