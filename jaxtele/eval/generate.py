"""`python -m jaxtele.eval.generate --model SOURCE (--prompt TEXT ... | --ids 1,2,3) [--chat] ...`: generate from
a model with the KV-cache decoder of `jaxtele.generation`."""

from jaxtele.errors import JaxteleError, cli
from jaxtele.generation import Sampling, chat_prompt_ids, generate
from jaxtele.models.decoder import check_token_ids


@cli
def main(argv=None):
  import argparse

  from jaxtele import source as model_source

  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.generate", description="Generate from a model.")
  p.add_argument("--model", required=True,
                 help="run directory, PEFT adapter folder, HF folder, hub id, jaxtele folder or .gguf")
  p.add_argument("--step", type=int, default=None, help="run directories: the checkpoint step (default: latest)")
  p.add_argument("--base", default=None, help="PEFT adapters: the base model (default: the adapter's)")
  p.add_argument("--prompt", action="append", help="text (repeat for a batch); chat template with --chat")
  p.add_argument("--ids", help="comma-separated prompt token ids instead of --prompt")
  p.add_argument("--chat", action="store_true")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  args = p.parse_args(argv)
  flags = model_source.Flags("--model")
  pre = model_source.load(model_source.resolve(args.model, args.step, args.base, flags), flags=flags)
  tok = pre.tokenizer
  if args.ids:
    try:
      prompts = [[int(x) for x in args.ids.split(",")]]
    except ValueError:
      raise JaxteleError(f"--ids: not a comma-separated list of integers: {args.ids!r}") from None
  elif args.prompt and tok is not None:
    prompts = [chat_prompt_ids(tok, t) if args.chat else tok.encode(t) for t in args.prompt]
  else:
    raise JaxteleError("--prompt (with a tokenizer) or --ids is required")
  for ids in prompts:
    check_token_ids(ids, pre.model.config.vocab_size, "--ids" if args.ids else "--prompt")
  stop = tuple(i for i in (getattr(tok, "eos_token_id", None),) if i is not None)
  if args.chat and tok is not None and "<|im_end|>" in tok.get_vocab():
    stop += (tok.get_vocab()["<|im_end|>"],)
  sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                      tuple(args.stop) if tok is not None else ())
  for out in generate(pre.model, prompts, sampling, tokenizer=tok):
    if tok is None:
      print(",".join(map(str, out)))
      continue
    text = tok.decode(out, skip_special_tokens=True)
    for s in args.stop:
      text = text.split(s, 1)[0]
    print(text)


if __name__ == "__main__":
  main()
