"""lm-evaluation-harness over any model jaxtele loads: a run directory, an HF / jaxtele folder, a `.gguf`, or a
PEFT adapter folder on its base. Scoring goes through jaxtele's batched scorer (eval/score.py), generation
through its KV-cache decoder (jaxtele/generation.py).

  python -m jaxtele.eval.harness --model jaxtele --model_args source=runs/my_run,batch_size=16 \\
      --tasks arc_easy,hellaswag --include_path my_tasks/ --output_path results/
  python -m jaxtele.eval.harness --model jaxtele --model_args source=adapter/,base=models/smollm2 --tasks ...

`python -m jaxtele.eval.harness` takes lm_eval's own arguments: importing this module registers the model
name `jaxtele` in lm-eval's registry, then lm_eval's command line runs (lm-eval 0.4.13 reads no plugin entry
points, so the bare `lm_eval` command does not know the name). From Python:
  import lm_eval, jaxtele.eval.harness  # registers "jaxtele"
  lm_eval.simple_evaluate(model="jaxtele", model_args="source=...", tasks=[...])

Requests are encoded exactly as lm-eval's `hf` model encodes them (TemplateLM: trailing context spaces move to
the continuation, the whole string is tokenized and split; the prefix token is BOS, else EOS; rolling windows
of `max_length`), so the two give the same numbers on the same weights.
"""

import sys

import numpy as np

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # an optional extra: say how to get it
  if __name__ == "__main__":
    print("error: lm-eval is not installed (pip install -e '.[lmeval]')", file=sys.stderr)
    sys.exit(2)
  raise ImportError("jaxtele.eval.harness needs lm-eval: pip install -e '.[lmeval]'") from e

from jaxtele.errors import JaxteleError
from jaxtele.eval.score import sequence_scores
from jaxtele.generation import Sampling, decode_until_stop, generate


def load_source(source: str, base: str | None = None, step: int | None = None, adapter: str | None = None):
  """(model, tokenizer) of any model source (source.py); `adapter` (a PEFT folder) goes onto it."""
  from jaxtele import source as model_source
  from jaxtele.convert.peft import load_adapter

  flags = model_source.Flags("--model_args source", "--model_args step", "--model_args base")
  loaded = model_source.load(model_source.resolve(source, step, base, flags), flags=flags)
  model, tokenizer = loaded.model, loaded.tokenizer
  if adapter:
    load_adapter(model, adapter)
  if tokenizer is None:
    raise JaxteleError(f"{source}: lm-eval needs a tokenizer and this source has none")
  return model, tokenizer


def _int(value, key: str):
  try:
    return None if value in (None, "", "None") else int(value)
  except (TypeError, ValueError):
    raise JaxteleError(f"--model_args {key}: expected an integer, got {value!r}") from None


# Arguments lm-eval passes every model; a JAX model places itself, so they change nothing here.
IGNORED_ARGS = {"device", "max_batch_size"}


@register_model("jaxtele")
class JaxteleLM(TemplateLM):
  """model_args: source (required), base (a PEFT source's base), adapter (a PEFT folder put on the source),
  step (a run's checkpoint), batch_size, max_length (default: the model's positions), max_gen_toks."""

  def __init__(self, source: str = "", base: str | None = None, adapter: str | None = None, step=None,
               batch_size=8, max_length=None, max_gen_toks=256, **other):
    super().__init__()
    unknown = sorted(set(other) - IGNORED_ARGS)
    if unknown:
      raise JaxteleError(f"--model_args {unknown[0]}: unknown (known: source, base, adapter, step, batch_size, "
                         "max_length, max_gen_toks)")
    if not source:
      raise JaxteleError("--model_args source=...: the model to evaluate is required")
    self._batch_size = _int(batch_size if batch_size != "auto" else 8, "batch_size") or 8
    self._max_gen_toks = _int(max_gen_toks, "max_gen_toks") or 256
    max_length, step = _int(max_length, "max_length"), _int(step, "step")
    self.model, self.tokenizer = load_source(source, base, step, adapter)
    self._max_length = max_length or self.model.config.max_position_embeddings

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
    return cls(**{**args, **extra})

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    bos = self.tokenizer.bos_token
    if add_special_tokens is None and bos and string.startswith(bos):
      kw = {"add_special_tokens": False}  # the string already holds its BOS
    return self.tokenizer.encode(string, **kw)

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(sum of log p(continuation), whether it is the greedy continuation) per (key, context, continuation);
    context + continuation is cut from the left to max_length + 1 tokens, as the `hf` model cuts it."""
    seqs, weights = [], []
    for _, context_enc, continuation_enc in requests:
      whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
      n = min(len(continuation_enc), len(whole) - 1)
      seqs.append(whole)
      weights.append([0] * (len(whole) - n) + [1] * n)
    sums, _, greedy = sequence_scores(self.model, seqs, weights, self._batch_size)
    out = [(-float(s), bool(g)) for s, g in zip(sums, greedy, strict=True)]
    for req, res in zip(requests, out, strict=True):
      if req[0] is not None:
        self.cache_hook.add_partial("loglikelihood", req[0], res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, ctx, cont))
        owners.append(i)
    scores = self._loglikelihood_tokens(windows)
    totals = np.zeros(len(requests))
    for i, (ll, _) in zip(owners, scores, strict=True):
      totals[i] += ll
    for req, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(total))
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request decoded by the KV-cache generator (greedy unless do_sample), cut at its stop strings or EOS;
    requests that share generation settings share batches."""
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    groups, out = {}, [None] * len(requests)
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      kw = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
      until = tuple(handle_stop_sequences(kw.pop("until", None), eos=eos))
      n_new = kw.pop("max_gen_toks")
      if n_new >= self.max_length:
        raise JaxteleError(f"generate_until: max_gen_toks {n_new} must be below max_length {self.max_length}")
      ids = self.tok_encode(context)[-(self.max_length - n_new):]
      temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
      key = (until, n_new, temp, float(kw.get("top_p", 1.0) or 1.0))
      groups.setdefault(key, []).append((i, ids))
    for (until, n_new, temp, top_p), items in groups.items():
      sampling = Sampling(n_new, temp, top_p, stop_ids=(self.eot_token_id,), stop_strings=until)
      gens = generate(self.model, [ids for _, ids in items], sampling, tokenizer=self.tokenizer,
                      batch_size=self._batch_size)
      for (i, _), ids in zip(items, gens, strict=True):
        out[i] = decode_until_stop(self.tokenizer, ids, until)
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out


def main(argv=None):
  """lm_eval's command line with `--model jaxtele` known (bad jaxtele input: one `error:` line, exit 2)."""
  from lm_eval.__main__ import cli_evaluate

  sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  except JaxteleError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
