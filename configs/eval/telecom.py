"""Telecom evaluation: what continual pretraining gained (3GPP held-out perplexity, TeleQnA standards questions
as multiple choice and as open questions) and what it cost (WikiText-2 perplexity against the base model).

  python -m jaxtele.eval --config configs/eval/telecom.py --model runs/smollm2_135m_full_pretrain \
      --config.forgetting.base=HuggingFaceTB/SmolLM2-135M --out runs/eval/full_pretrain
Data paths are under `data_root` (default ../shared/data, relative to where you run): --config.data_root=DIR.
Without --config.forgetting.base the forgetting comparison is skipped.
"""

from jaxtele.eval.config import default_config
from jaxtele.eval.items import STANDARDS

DATA = "{data_root}"
TELEQNA = DATA + "/teleqna/TeleQnA.json"


def get_config():
  cfg = default_config()
  cfg.data_root = "../shared/data"
  cfg.out = "runs/eval/telecom"
  cfg.perplexity.sets = [
      # The clauses `python -m jaxtele.data prepare --heldout-spec-fraction 0.1` holds out (2% by clause id, of
      # the specs not held out whole), read from the Markdown: its split `eval`, clause for clause.
      # Always in full (its own sample: 1.0, whatever perplexity.sample says).
      {"name": "3gpp_heldout", "sources": [{"type": "3gpp", "path": DATA + "/3gpp", "eval_fraction": 0.02,
                                            "heldout_spec_fraction": 0.1}], "format": "text", "sample": 1.0},
      # Whole specs held out (prepare --heldout-spec-fraction 0.1: TS 23.502, 38.211, 38.214), scored per
      # perplexity.sample (on CPU, e.g. --config.perplexity.sample=0.05).
      {"name": "3gpp_heldout_spec", "sources": [{"type": "3gpp", "path": DATA + "/3gpp", "eval_fraction": 0.02,
                                                 "holdout": "spec", "heldout_spec_fraction": 0.1}], "format": "text"},
      # The whole WikiText-2 test set, one document per article (62); on CPU a stated sample of the articles:
      # --config.perplexity.sample=0.25 (results report the fraction of tokens scored).
      {"name": "wikitext2", "sources": [{"type": "wikitext", "path": DATA + "/wikitext2/wiki.test.raw"}],
       "format": "text"},
  ]
  # Both sets are scored in full (max_batches 0), with bits per byte by spec, series and content type.
  cfg.perplexity.update(seq_len=1024, batch_size=8, max_batches=0)
  # The whole standards set (3,000 items) in both styles: cloze (options as continuations) and letter (options
  # listed A-E, the letter scored; "All of the above" is answerable). An instruct model is asked in its chat
  # format with --config.mcq.letter_template=tokenizer. Results carry chance / longest / shortest baselines and a
  # 3GPP / IEEE / other breakdown; --config.mcq.limit=N for a quick look.
  standards = {"path": TELEQNA, "format": "teleqna", "categories": list(STANDARDS), "limit": 0, "seed": 0}
  cfg.mcq.sets = [{"name": "teleqna_standards", **standards, "style": "cloze"},
                  {"name": "teleqna_standards_letter", **standards, "style": "letter"}]
  cfg.open_qa.sets = [{"name": "teleqna_standards_open", "path": TELEQNA, "format": "teleqna",
                       "categories": list(STANDARDS), "limit": 200, "seed": 1, "answer_field": "option"},
                      # The same questions, TeleQnA's explanation (a sentence or two) as the reference answer:
                      # answer perplexity on longer text (generation is scored against the options above).
                      {"name": "teleqna_standards_explanation", "path": TELEQNA, "format": "teleqna",
                       "categories": list(STANDARDS), "limit": 200, "seed": 1, "answer_field": "explanation",
                       "generate": False}]
  cfg.generation.update(max_new_tokens=48, temperature=0.0, stop=["\n\n"])
  # Set the base the evaluated model started from, e.g. --config.forgetting.base=HuggingFaceTB/SmolLM2-135M
  cfg.forgetting.sets = ["wikitext2"]
  # Questions whose text (with the answer) overlaps the 3GPP training text: flagged, and scores on clean items.
  cfg.contamination.corpus = [DATA + "/3gpp"]
  return cfg
