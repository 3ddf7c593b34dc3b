"""The Grain pipeline: sources, bad input, SFT masks, mixtures, determinism, sharding and resume."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from jaxtele.data import pipeline, sft, threegpp
from jaxtele.data.prepare import prepare_3gpp
from jaxtele.data.sources import make_source
from jaxtele.data.tokenize import DocTokenizer
from jaxtele.errors import JaxteleError

VOCAB = 49152


@pytest.fixture(scope="module")
def doc_tok(smollm2_tokenizer):
  return DocTokenizer(smollm2_tokenizer, VOCAB)


def write_jsonl(path, objs, extra_lines=()):
  with open(path, "w") as f:
    for o in objs:
      f.write(json.dumps(o) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return str(path)


def config(sources, **kw):
  cfg = pipeline.default_config()
  cfg.sources = sources
  cfg.seq_len, cfg.batch_size = 64, 4
  cfg.update(kw)
  return cfg


def take(ds, n):
  it = iter(ds)
  out = [next(it) for _ in range(n)]
  it.close() if hasattr(it, "close") else None
  return out


# --- sources -------------------------------------------------------------------------------------

def test_every_source_type_reads_the_same_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = [f"document number {i} about the gNB" for i in range(5)]
  (tmp_path / "folder").mkdir()
  for i, t in enumerate(texts):
    (tmp_path / "folder" / f"{i}.md").write_text(t)
  jsonl = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in texts])
  pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
  got = {
      "text": make_source({"type": "text", "path": str(tmp_path / "folder")}),
      "jsonl": make_source({"type": "jsonl", "path": jsonl, "field": "body"}),
      "parquet": make_source({"type": "parquet", "path": str(tmp_path / "d.parquet"), "field": "body"}),
  }
  for kind, src in got.items():
    assert [src[i]["text"] for i in range(len(src))] == texts, kind


def test_tfds_source_reads_a_prepared_dataset_without_tensorflow(prepared):
  import sys

  out_dir, clauses, _ = prepared
  src = make_source({"type": "tfds", "path": os.path.join(out_dir, "telecom_corpus", "1.0.0"), "split": "train"})
  rec = src[0]
  assert isinstance(rec["id"], str) and rec["tokens"].dtype == np.int32
  assert "tensorflow" not in sys.modules


# --- bad input -----------------------------------------------------------------------------------

def test_malformed_json_line_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}], ['{"text": "broken'])
  with pytest.raises(JaxteleError, match=r"bad\.jsonl:2: malformed JSON line"):
    make_source({"type": "jsonl", "path": path})
  src = make_source({"type": "jsonl", "path": path, "skip_malformed": True})
  assert len(src) == 1 and src.stats["skipped_malformed"] == 1


def test_json_files_fail_in_one_line_naming_file_and_line(tmp_path):
  """The json source, an HF config.json and a PEFT adapter_config.json are read by one reader: missing,
  malformed (with its line) and non-UTF-8 files are one line each."""
  from jaxtele.convert import hf, peft

  readers = {"items.json": lambda d: make_source({"type": "json", "path": str(d / "items.json")}),
             "config.json": lambda d: hf.read_config(str(d)),
             "adapter_config.json": lambda d: peft.read_config(str(d))}
  missing = {"items.json": "no such file (json source)", "config.json": "missing (not a Hugging Face model folder)",
             "adapter_config.json": "missing (not a PEFT adapter folder)"}
  for name, read in readers.items():
    d = tmp_path / name.replace(".", "_")
    d.mkdir()
    for content, words in ((None, missing[name]), ('[\n{"a": 1},\n{"a" 2}\n]', ":3: malformed JSON (Expecting ':' delimiter)"),
                           (b'["\xff"]', ": not UTF-8")):
      if content is not None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
      with pytest.raises(JaxteleError) as e:
        read(d)
      assert str(e.value) == (f"{d / name}: {words}" if content is None else f"{d / name}{words}")


def test_empty_and_non_utf8_documents_are_counted_not_fatal(tmp_path):
  (tmp_path / "a.txt").write_text("real text")
  (tmp_path / "b.txt").write_text("   \n")
  (tmp_path / "c.txt").write_bytes(b"\xff\xfe broken \xc3")
  src = make_source({"type": "text", "path": str(tmp_path)})
  assert len(src) == 1 and src.stats == {"dropped_empty": 1, "dropped_non_utf8": 1}


@pytest.mark.parametrize("separator", [[], ["--"]])
def test_inspect_takes_overrides_as_train_does(workdir, capsys, separator):
  """`data inspect` parses its arguments with the trainer's helper: overrides need no `--` (still accepted)."""
  from jaxtele.data.__main__ import main

  recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_test.py")
  main(["inspect", "--config", recipe, "--batches", "1", *separator, "--config.data.seq_len=24",
        "--config.data.batch_size=2"])
  out = capsys.readouterr().out
  shapes = out.split("batch 0: ", 1)[1].split("}", 1)[0]
  assert shapes.count("[2, 24]") == 5 and "'tokens': [2, 24]" in shapes and "batch 1" not in out


def test_unknown_source_type_field_and_key(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
  with pytest.raises(JaxteleError, match=r"data.sources\[0\].type: unknown source type 'csv'"):
    make_source({"type": "csv", "path": path}, "data.sources[0]")
  with pytest.raises(JaxteleError, match=r"d.jsonl:1: missing field 'body'"):
    make_source({"type": "jsonl", "path": path, "field": "body"})
  with pytest.raises(JaxteleError, match=r"unknown key 'colum'"):
    make_source({"type": "jsonl", "path": path, "colum": "x"})
  with pytest.raises(JaxteleError, match=r"no such file"):
    make_source({"type": "jsonl", "path": str(tmp_path / "missing.jsonl")})


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, smollm2_tokenizer):
  with pytest.raises(JaxteleError, match=r"the tokenizer has 49152 tokens but the model's vocab_size is 100"):
    DocTokenizer(smollm2_tokenizer, vocab_size=100)
  path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": [5, 7, 49152]}])
  small = DocTokenizer(smollm2_tokenizer, VOCAB)
  with pytest.raises(JaxteleError, match=r"d.jsonl:1: token id 49152 is outside the model vocabulary \[0, 49152\)"):
    take(pipeline.build(config([{"type": "jsonl", "path": path, "fields": ["tokens"]}], format="tokens"), small), 1)


# --- SFT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["alpaca", "chatml", "tokenizer"])
def test_sft_trains_exactly_response_and_eos(shared_data, doc_tok, smollm2_tokenizer, template):
  """Every packed record: masked-out ids decode to its prompt, trained targets are its response + EOS."""
  spec = {"type": "json", "path": os.path.join(shared_data, "alpaca", "alpaca_5000.json"),
          "fields": ["instruction", "input", "output"]}
  src = make_source(spec)
  by_prompt = {sft.prompt_text(template, src[i], smollm2_tokenizer): src[i] for i in range(len(src))}
  cfg = config([spec], format="sft", sft_template=template, seq_len=1024, batch_size=2)
  eos = sft.end_token_id(template, smollm2_tokenizer)
  checked = 0
  for b in take(pipeline.build(cfg, doc_tok), 4):
    for row in range(len(b["tokens"])):
      for s in np.unique(b["segment_ids"][row]):
        idx = np.flatnonzero(b["segment_ids"][row] == s)
        if not s or b["positions"][row][idx[0]] != 0 or idx[-1] == cfg.seq_len - 1:
          continue  # padding, or a piece of a record split across rows
        mask = b["loss_mask"][row][idx]
        prompt = [b["tokens"][row][idx[0]]] + b["targets"][row][idx][mask == 0].tolist()
        record = by_prompt[smollm2_tokenizer.decode(prompt)]
        want = smollm2_tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [eos]
        assert b["targets"][row][idx][mask == 1].tolist() == want
        assert mask.tolist() == sorted(mask.tolist()), "the prompt comes first, then only trained tokens"
        checked += 1
  assert checked >= 6, checked


def test_sft_prompt_is_the_one_evaluation_uses(smollm2_tokenizer):
  rec = {"instruction": "Name the MAC entity.", "input": "", "output": "x"}
  assert sft.prompt_text("alpaca", rec).endswith("### Response:\n")
  assert sft.prompt_text("tokenizer", rec, smollm2_tokenizer).endswith("<|im_start|>assistant\n")


# --- mixtures, determinism, sharding, resume -----------------------------------------------------

@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix")
  telecom = write_jsonl(d / "telecom.jsonl", [{"text": f"telecom {i} " * 5} for i in range(200)])
  general = write_jsonl(d / "general.jsonl", [{"text": f"general {i} " * 5} for i in range(200)])
  return telecom, general


def test_mixture_follows_weights(two_corpora, doc_tok, smollm2_tokenizer):
  telecom, general = two_corpora
  cfg = config([{"type": "jsonl", "path": telecom, "weight": 0.9}, {"type": "jsonl", "path": general, "weight": 0.1}],
               seq_len=64, batch_size=8)
  general_id = smollm2_tokenizer(" general", add_special_tokens=False)["input_ids"][0]
  telecom_id = smollm2_tokenizer(" telecom", add_special_tokens=False)["input_ids"][0]
  counts = np.zeros(2)
  for b in take(pipeline.build(cfg, doc_tok), 40):
    counts += [(b["tokens"] == telecom_id).sum(), (b["tokens"] == general_id).sum()]
  share = counts[1] / counts.sum()
  assert 0.05 < share < 0.15, share


def test_same_seed_same_batches_other_seed_other_batches(two_corpora, doc_tok):
  cfg = config([{"type": "jsonl", "path": two_corpora[0]}])
  a, b = take(pipeline.build(cfg, doc_tok), 5), take(pipeline.build(cfg, doc_tok), 5)
  cfg.seed = 1
  c = take(pipeline.build(cfg, doc_tok), 5)
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=True))


def test_each_process_reads_its_own_shard(two_corpora, doc_tok):
  cfg = config([{"type": "jsonl", "path": two_corpora[0]}], shuffle=False, batch_size=4)
  seen = []
  for p in range(2):
    docs = set()
    for b in pipeline.build(cfg, doc_tok, process_index=p, process_count=2, train=False):
      assert b["tokens"].shape == (2, 64)
      docs |= {tuple(b["tokens"][r][b["segment_ids"][r] == s]) for r in range(2)
               for s in np.unique(b["segment_ids"][r]) if s}
    seen.append(docs)
  assert len(seen[0]) == len(seen[1]) == 100 and not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(two_corpora, doc_tok, workers):
  cfg = config([{"type": "jsonl", "path": two_corpora[0], "weight": 0.7},
                {"type": "jsonl", "path": two_corpora[1], "weight": 0.3}], workers=workers)
  n, m = 7, 5
  it = iter(pipeline.build(cfg, doc_tok))
  uninterrupted = [next(it) for _ in range(n + m)]
  it.close()
  it = iter(pipeline.build(cfg, doc_tok))
  for _ in range(n):
    next(it)
  state = it.get_state()
  it.close()
  restored = iter(pipeline.build(cfg, doc_tok))
  restored.set_state(state)
  resumed = [next(restored) for _ in range(m)]
  restored.close()
  for want, got in zip(uninterrupted[n:], resumed, strict=True):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


# --- real data -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(shared_data, smollm2_tokenizer, tmp_path_factory):
  specs = tmp_path_factory.mktemp("specs")
  for name in ("37.324_SDAP_j00.md", "38.202_PHY_Services_j00.md", "38.340_BAP_j00.md"):
    shutil.copy(os.path.join(shared_data, "3gpp", name), specs)
  out = str(tmp_path_factory.mktemp("prepared"))
  stats = prepare_3gpp(str(specs), out, smollm2_tokenizer, VOCAB, eval_fraction=0.2, log=lambda s: None,
                       heldout_specs="38.340")
  return out, threegpp.read_specs(str(specs)), stats


def split_records(out_dir, splits=("train", "eval", "eval_spec")) -> dict:
  path = os.path.join(out_dir, "telecom_corpus", "1.0.0")
  srcs = {s: make_source({"type": "tfds", "path": path, "split": s}) for s in splits}
  return {s: [src[i] for i in range(len(src))] for s, src in srcs.items()}


def test_prepared_clauses_round_trip_and_splits_are_disjoint(prepared, smollm2_tokenizer):
  out, clauses, stats = prepared
  records = split_records(out)
  ids = {s: {r["id"] for r in recs} for s, recs in records.items()}
  assert ids["train"] and ids["eval"] and ids["eval_spec"]
  assert not ids["train"] & ids["eval"] and not (ids["train"] | ids["eval"]) & ids["eval_spec"]
  expected = {c.id: c.text for c in clauses}
  got = {r["id"]: r for recs in records.values() for r in recs}
  assert set(got) == set(expected)
  for doc_id, rec in got.items():
    assert rec["text"] == expected[doc_id]
    assert smollm2_tokenizer.decode(rec["tokens"]) == expected[doc_id] + "<|endoftext|>"
  assert got["TS 37.324 5.1.1"]["text"].startswith("5.1.1 SDAP entity establishment\n")
  assert "TS 37.324 5.1" not in got  # a heading with no body of its own
  assert stats["tokens_dropped"]["front_matter"] > 0
  assert sum(stats["documents"].values()) == len(clauses)


def test_a_held_out_spec_lands_whole_in_eval_spec_and_never_in_train(prepared, shared_data, smollm2_tokenizer):
  out, _, stats = prepared
  records = split_records(out)
  bap = threegpp.read_specs_file(os.path.join(shared_data, "3gpp", "38.340_BAP_j00.md"))  # the held-out spec alone
  assert sorted(r["id"] for r in records["eval_spec"]) == sorted(c.id for c in bap)
  assert not any(r["id"].startswith("TS 38.340 ") for s in ("train", "eval") for r in records[s])
  assert {" ".join(r["id"].split()[:2]) for r in records["train"]} == {"TS 37.324", "TS 38.202"}
  want_tokens = sum(len(smollm2_tokenizer(c.text, add_special_tokens=False)["input_ids"]) + 1 for c in bap)  # + EOS
  assert stats["documents"]["eval_spec"] == len(bap) and stats["tokens"]["eval_spec"] == want_tokens
  assert stats["specs"] == {"train": 2, "eval": 2, "eval_spec": 1} and stats["heldout_specs"] == ["TS 38.340"]
  # The raw-Markdown eval source holds out the same documents as the prepared splits.
  from jaxtele.eval.text_sets import HeldOutClauses

  for holdout, split, tfds_split in (("spec", "eval", "eval_spec"), ("clause", "eval", "eval"),
                                     ("clause", "train", "train")):
    got = HeldOutClauses(stats["source"], 0.2, split, holdout=holdout, heldout_specs=["TS 38.340"]).records
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in records[tfds_split]), (holdout, split)


def test_held_out_specs_by_fraction_and_by_a_wrong_name(tmp_path, smollm2_tokenizer):
  """20 hand-written specs; a spec is held out when SHA-256 of its number, as a fraction of 2^64, is < 0.3."""
  import hashlib

  from jaxtele.eval.text_sets import HeldOutClauses

  for n in range(20):
    (tmp_path / f"99.{n:03d}_x.md").write_text(f"# 1Scope\nScope of {n}.\n# 2General\nText {n}.\n## 2.1Detail\nMore.\n")
  held = {f"TS 99.{n:03d}" for n in range(20) if int.from_bytes(hashlib.sha256(f"99.{n:03d}".encode()).digest()[:8],
                                                                    "big") / 2**64 < 0.3}
  assert 0 < len(held) < 20
  kw = dict(eval_fraction=0.3, heldout_spec_fraction=0.3)
  spec = HeldOutClauses(str(tmp_path), split="eval", holdout="spec", **kw).records
  train = HeldOutClauses(str(tmp_path), split="train", **kw).records
  clause = HeldOutClauses(str(tmp_path), split="eval", holdout="clause", **kw).records
  assert sorted(r["id"] for r in spec) == sorted(f"{s} {c}" for s in held for c in ("1", "2", "2.1"))
  assert len(spec) + len(train) + len(clause) == 60
  assert not {" ".join(r["id"].split()[:2]) for r in train + clause} & held
  with pytest.raises(JaxteleError, match=rf"^{re.escape(str(tmp_path))}: held-out spec 99.999 is not in the corpus"):
    prepare_3gpp(str(tmp_path), str(tmp_path / "out"), smollm2_tokenizer, VOCAB, heldout_specs="99.001,99.999",
                 log=lambda s: None)
  assert not (tmp_path / "out").exists()
  with pytest.raises(JaxteleError, match="holdout 'spec' needs heldout_specs or heldout_spec_fraction"):
    HeldOutClauses(str(tmp_path), holdout="spec")


def test_prepare_refuses_to_overwrite(prepared, smollm2_tokenizer, shared_data):
  out, _, _ = prepared
  with pytest.raises(JaxteleError, match="already holds a prepared dataset"):
    prepare_3gpp(os.path.join(shared_data, "3gpp"), out, smollm2_tokenizer, VOCAB)


def test_clause_split_drops_boilerplate_and_keeps_tables():
  text = ("Title page\nContents\n1Scope3\n# Foreword\nboiler\n# 1Scope\nScope text.\n## 4.3.5.2Change of SSC mode 3\n"
          "| a | b |\n|---|---|\n| 1 | 2 |\n# 5Empty\n# Annex A (informative):Change history\n| CR |\n")
  clauses = threegpp.split_spec(text, "TS 99.999")
  assert [c.id for c in clauses] == ["TS 99.999 1", "TS 99.999 4.3.5.2"]
  assert clauses[1].text == "4.3.5.2 Change of SSC mode 3\n| a | b |\n|---|---|\n| 1 | 2 |"


@pytest.mark.parametrize("key, value, says", [
    ("packing", "nope", "config: data.packing: 'nope' is not one of"),
    ("seq_len", 1, "config: data.seq_len: must be >= 2, got 1"),
    ("batch_size", 0, "config: data.batch_size: must be >= 1, got 0"),
    ("sources", [], "config: data.sources: no data sources configured")])
def test_a_data_config_built_in_code_gets_the_recipes_one_line_errors(key, value, says):
  """A data config made in code (sources as a plain list, as eval sets are built) passes the schema's rules, and a
  bad value gets the same `config: data.KEY: ...` line a recipe override gets (test_config_rules)."""
  from jaxtele.data.pipeline import default_config, validate

  cfg = default_config()
  cfg.sources = [{"type": "jsonl", "path": "x.jsonl"}]
  validate(cfg)
  cfg[key] = value
  with pytest.raises(JaxteleError) as e:
    validate(cfg)
  assert str(e.value).startswith(says) and "\n" not in str(e.value)
