"""Instruction records -> (tokens, loss weights): the prompt is context, the response + EOS is trained.

`prompt_text` is the single place prompts are rendered, used by training and by evaluation alike.
"""

import numpy as np

from jaxtele.errors import JaxteleError

ALPACA = {
    "with_input": ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "no_input": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
CHATML = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATES = ("alpaca", "chatml", "tokenizer")


def user_message(record: dict) -> str:
  return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def prompt_text(template: str, record: dict, tokenizer=None) -> str:
  """The prompt for `record` ({instruction, input?}) under `template`, ending where the response starts."""
  if template == "alpaca":
    return ALPACA["with_input" if record.get("input") else "no_input"].format(
        instruction=record["instruction"], input=record.get("input", ""))
  if template == "chatml":
    return CHATML.format(user=user_message(record))
  if template == "tokenizer":
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
      raise JaxteleError("data.sft_template: 'tokenizer' needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(record)}],
                                         add_generation_prompt=True, tokenize=False)
  raise JaxteleError(f"data.sft_template: unknown template {template!r} (choose from {', '.join(TEMPLATES)})")


def end_token_id(template: str, tokenizer) -> int:
  """The token that closes a response: ChatML's <|im_end|>, else the tokenizer's EOS."""
  if template == "chatml":
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" not in vocab:
      raise JaxteleError("data.sft_template: 'chatml' needs <|im_end|> in the tokenizer's vocabulary")
    return vocab["<|im_end|>"]
  if tokenizer.eos_token_id is None:
    raise JaxteleError("data.sft_template: the tokenizer has no eos_token to end responses with")
  return tokenizer.eos_token_id


def encode_example(record: dict, template: str, doc_tok) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights): weights are 0 on prompt tokens, 1 on response tokens and the closing EOS."""
  for key in ("instruction", "output"):
    if not isinstance(record.get(key), str):
      raise JaxteleError(f"{record.get('id', 'record')}: SFT record needs a string field {key!r}")
  prompt = doc_tok.encode(prompt_text(template, record, doc_tok.tokenizer), bos=True, eos=False)
  response = doc_tok.encode(record["output"], bos=False, eos=False)
  ids = np.concatenate([prompt, response, [end_token_id(template, doc_tok.tokenizer)]]).astype(np.int32)
  weights = np.concatenate([np.zeros(len(prompt)), np.ones(len(response) + 1)]).astype(np.int32)
  return doc_tok.check(ids, record.get("id", "record")), weights
