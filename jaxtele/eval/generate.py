"""Greedy decoding over a fixed-size token buffer (one compilation per buffer size)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.errors import JaxteleError, cli
from jaxtele.models.decoder import Decoder, check_token_ids


@nnx.jit
def _next_token(model: Decoder, tokens_1L, length):
  L = tokens_1L.shape[1]
  idx = jnp.arange(L)
  # Slots past `length` are padding (segment 0): causal attention never reads them anyway.
  logits_1LV = model(tokens_1L, idx[None], (idx < length).astype(jnp.int32)[None])
  return jnp.argmax(logits_1LV[0, length - 1])


def greedy(model: Decoder, prompt_ids, max_new_tokens: int, stop_ids=()) -> list[int]:
  """Continue `prompt_ids` greedily; stops at any of `stop_ids`. Returns the new ids only."""
  prompt = check_token_ids(prompt_ids, model.config.vocab_size, "prompt").tolist()
  size = -(-(len(prompt) + max_new_tokens) // 64) * 64
  buf = np.zeros((1, size), np.int32)
  buf[0, :len(prompt)] = prompt
  n, out = len(prompt), []
  for _ in range(max_new_tokens):
    tok = int(_next_token(model, jnp.asarray(buf), n))
    out.append(tok)
    if tok in stop_ids:
      break
    buf[0, n] = tok
    n += 1
  return out


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
  """Token ids of a one-turn chat prompt in the tokenizer's own template, ending at the assistant's turn."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True,
                                       tokenize=False)
  return tokenizer.encode(text, add_special_tokens=False)


@cli
def main(argv=None):
  import argparse

  from jaxtele.convert import load_pretrained

  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.generate", description="Greedy generation from a model.")
  p.add_argument("--model", required=True, help="HF folder, hub id or .gguf")
  p.add_argument("--prompt", help="text; wrapped in the chat template with --chat")
  p.add_argument("--ids", help="comma-separated prompt token ids instead of --prompt")
  p.add_argument("--chat", action="store_true")
  p.add_argument("--max-new-tokens", type=int, default=64)
  args = p.parse_args(argv)
  pre = load_pretrained(args.model)
  tok = pre.tokenizer
  if args.ids:
    try:
      ids = [int(x) for x in args.ids.split(",")]
    except ValueError:
      raise JaxteleError(f"--ids: not a comma-separated list of integers: {args.ids!r}") from None
  elif args.prompt is not None and tok is not None:
    ids = chat_prompt_ids(tok, args.prompt) if args.chat else tok.encode(args.prompt)
  else:
    raise JaxteleError("--prompt (with a tokenizer) or --ids is required")
  stop = tuple(i for i in (getattr(tok, "eos_token_id", None),) if i is not None)
  check_token_ids(ids, pre.model.config.vocab_size, "--ids" if args.ids else "--prompt")
  out = greedy(pre.model, ids, args.max_new_tokens, stop)
  print(tok.decode(out) if tok is not None else ",".join(map(str, out)))


if __name__ == "__main__":
  main()
