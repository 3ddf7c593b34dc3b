"""Documents -> token ids with the model's HF tokenizer; BOS/EOS placed the way the family expects."""

import numpy as np

from jaxtele.errors import JaxteleError

# The document separator a family was pretrained with, when the tokenizer has it; else its eos_token.
DOC_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


class DocTokenizer:
  """Wraps an HF tokenizer. BOS: only if the tokenizer itself adds one (Llama 3 yes; SmolLM2, Qwen2.5
  no). EOS: appended to every document so the model learns where documents end."""

  def __init__(self, tokenizer, vocab_size: int, doc_end_token: str | None = None):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size
    if len(tokenizer) > vocab_size:
      raise JaxteleError(f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}")
    probe = tokenizer("a")["input_ids"]
    self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [
        tokenizer.bos_token_id] else None
    vocab = tokenizer.get_vocab()
    if doc_end_token is not None and doc_end_token not in vocab:
      raise JaxteleError(f"data.doc_end_token: {doc_end_token!r} is not in the tokenizer's vocabulary")
    name = doc_end_token or next((t for t in DOC_END_TOKENS if t in vocab), tokenizer.eos_token)
    self.eos_id = vocab[name] if name is not None else None

  def encode(self, text: str, bos=True, eos=True, source="document") -> np.ndarray:
    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ([self.bos_id] if bos and self.bos_id is not None else []) + ids
    ids = ids + ([self.eos_id] if eos and self.eos_id is not None else [])
    return self.check(np.asarray(ids, np.int32), source)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    batch = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
    head = [self.bos_id] if self.bos_id is not None else []
    tail = [self.eos_id] if self.eos_id is not None else []
    return [self.check(np.asarray(head + ids + tail, np.int32)) for ids in batch]

  def check(self, ids: np.ndarray, source="document") -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
      raise JaxteleError(f"{source}: token id {bad} is outside the model vocabulary [0, {self.vocab_size})")
    return ids
