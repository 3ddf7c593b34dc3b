"""Prompt templates for evaluation: the named SFT templates of `jaxtele.data.sft` (so a model is asked the
way it was trained) or a custom format string with a `{question}` slot."""

import os

from jaxtele.data import sft
from jaxtele.errors import JaxteleError
from jaxtele.run import RUN_RECORD, record_config


def run_template(source: str, run_cfg=None) -> tuple[str | None, str]:
  """(the SFT template a model was trained with, where that was read) or (None, why not). A run that trained on
  plain text or tokens (continual pretraining) has no instruction template: it is evaluated as its base is."""
  where = "the run's config (data.sft_template)"
  if run_cfg is None:
    run_cfg = record_config(source) if os.path.isdir(source) else None
    if run_cfg is None:
      return None, "no run record"
    where = os.path.join(source, RUN_RECORD)
  fmt, template = run_cfg.data.format, run_cfg.data.sft_template
  if fmt != "sft":
    return None, f"the run trained on data.format={fmt!r} (no instruction template)"
  return template, where


def resolve(configured: str, source: str, run_cfg, tokenizer, key: str) -> tuple[str, str]:
  """(template, origin): the configured one, else the model's training template, else its tokenizer's chat
  template, else alpaca."""
  if configured:
    check(configured, key)
    return configured, f"config ({key})"
  trained, origin = run_template(source, run_cfg)
  if trained:
    return trained, origin
  if tokenizer is not None and getattr(tokenizer, "chat_template", None):
    return "tokenizer", "the tokenizer's chat template (no training template recorded)"
  return "alpaca", "default (no training template recorded, no chat template)"


def check(template: str, key: str):
  if template in sft.TEMPLATES:
    return
  if "{question}" not in template:
    raise JaxteleError(f"config: {key}: template {template!r} has no {{question}} slot (or use one of "
                       f"{', '.join(sft.TEMPLATES)})")
  try:
    template.format(question="", options="")
  except (KeyError, IndexError, ValueError) as e:
    raise JaxteleError(f"config: {key}: template {template!r} has an unknown slot or stray brace ({e})") from None


def render(template: str, question: str, tokenizer=None, options: str = "") -> str:
  """The prompt for one question, ending where the answer starts."""
  if template in sft.TEMPLATES:
    return sft.prompt_text(template, {"instruction": question}, tokenizer)
  return template.format(question=question, options=options)


def continuation(context: str, text: str) -> str:
  """The one rule by which an answer or an option continues its prompt: a leading space after a non-space (so
  "Answer:" + "Paris" is scored as "Answer: Paris", the way the text would be written and tokenised), nothing
  after whitespace (a chat template's "assistant\n")."""
  return text if not context or context[-1].isspace() else " " + text


def end_token(template: str, tokenizer) -> int | None:
  """The token that closed answers in training (None for a custom template of a tokenizer without EOS)."""
  if template in sft.TEMPLATES:
    return sft.end_token_id(template, tokenizer)
  return tokenizer.eos_token_id
