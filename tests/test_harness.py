"""lm-eval adapter: `python -m jaxtele.eval.harness --model jaxtele` (lm_eval's own command line) on local task
YAMLs (multiple choice, rolling perplexity, generation) gives lm-eval's `hf` model's numbers on the same weights,
item by item, within 1e-3 relative."""

import glob
import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

MCQ = [{"question": "Which entity terminates NAS signalling?", "choices": ["AMF", "gNB-DU", "UPF"], "answer": 0},
       {"question": "What does PDU stand for?", "choices": ["Protocol Data Unit", "Packet Delay", "Paging"],
        "answer": 0},
       {"question": "Which release introduced 5G NR?", "choices": ["Release 8", "Release 15"], "answer": 1}]
TEXT = [{"text": "The SMF selects a UPF for the PDU session and installs packet detection rules over N4. " * 3},
        {"text": "Radio resource control messages carry the measurement configuration of the UE."}]
GEN = [{"prompt": "The AMF is", "target": " the access and mobility function"}, {"prompt": "N4 links", "target": "x"}]
TASKS = {
    "tiny_mcq": "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
                "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n",
}


def write_tasks(root):
  """One YAML per task reading a local JSONL file (no dataset hub)."""
  for name, rows in (("tiny_mcq", MCQ), ("tiny_ppl", TEXT), ("tiny_gen", GEN)):
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\ntest_split: test\n" + TASKS[name])


def per_item(samples: dict) -> dict:
  """{task: [per-request log-likelihoods or generated texts, in doc and request order]} from lm-eval's logged
  samples (its JSONL files write the numbers as strings)."""
  out = {}
  for task, rows in samples.items():
    vals = []
    for row in sorted(rows, key=lambda r: r["doc_id"]):
      for resp in row["resps"]:
        r = resp[0]
        vals.append(r if task == "tiny_gen" else float(r[0] if isinstance(r, (list, tuple)) else r))
    out[task] = vals
  return out


def test_jaxtele_model_equals_lm_eval_hf_model(tmp_path, make_hf_model, monkeypatch):
  from lm_eval.tasks import TaskManager

  from jaxtele.data.byte_tokenizer import byte_tokenizer
  from jaxtele.eval import harness

  from lm_eval.tasks import manager

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  # Index only the local tasks: lm-eval's 14k built-in task YAMLs take seconds to scan and are not used here.
  init = manager.TaskManager.__init__
  monkeypatch.setattr(manager.TaskManager, "__init__",
                      lambda self, verbosity=None, include_path=None, include_defaults=False, metadata=None:
                      init(self, verbosity, include_path, False, metadata))
  folder = tmp_path / "hf"
  make_hf_model("llama_untied", vocab_size=264).save_pretrained(folder)
  byte_tokenizer().save_pretrained(folder)
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  write_tasks(tasks)
  names = "tiny_mcq,tiny_ppl,tiny_gen"
  # max_length 64 splits the long text into several rolling windows
  harness.main(["--model", "jaxtele", "--model_args", f"source={folder},max_length=64", "--tasks", names,
                "--include_path", str(tasks), "--batch_size", "4", "--log_samples", "--output_path",
                str(tmp_path / "out")])
  (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  ours = json.load(open(results_file))
  our_samples = {t: [json.loads(line) for line in open(f)] for t in names.split(",")
                 for f in glob.glob(str(tmp_path / "out" / "**" / f"samples_{t}_*.jsonl"), recursive=True)}
  theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,max_length=64,"
                                   "device=cpu", tasks=names.split(","), batch_size=4, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
  a, b = per_item(our_samples), per_item(theirs["samples"])
  assert [len(a[t]) for t in sorted(a)] == [len(b[t]) for t in sorted(b)] == [len(GEN), 8, len(TEXT)]
  for task in ("tiny_mcq", "tiny_ppl"):
    np.testing.assert_allclose(a[task], b[task], rtol=1e-3)
  assert a["tiny_gen"] == b["tiny_gen"] and all(a["tiny_gen"])  # the same greedy text
  for task, metrics in theirs["results"].items():
    for key, value in metrics.items():
      if isinstance(value, float) and "stderr" not in key:
        np.testing.assert_allclose(ours["results"][task][key], value, rtol=1e-3, err_msg=f"{task} {key}")


def test_bad_model_args_are_one_line_errors(tmp_path):
  from lm_eval.api.registry import get_model

  from jaxtele.errors import JaxteleError
  from jaxtele.eval import harness

  cls = get_model("jaxtele")  # registered by importing jaxtele.eval.harness
  assert cls is harness.JaxteleLM
  with pytest.raises(JaxteleError, match=r"^--model_args source=\.\.\.: the model to evaluate is required$"):
    cls.create_from_arg_string("max_length=64")
  with pytest.raises(JaxteleError, match="--model_args batch_size: expected an integer, got 'big'"):
    cls.create_from_arg_string(f"source={tmp_path},batch_size=big")
