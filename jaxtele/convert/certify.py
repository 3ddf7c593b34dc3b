"""Export certificates: an artifact is reloaded the way its users will load it and compared with the in-memory
model it came from, in its temporary folder, before it is renamed into place.

Checks (each recorded in `certificate.json` beside the artifact, with its numbers):
  reload      transformers (HF folders), peft.PeftModel.from_pretrained on the base (adapters: no missing or
              unexpected keys), the gguf reader + our importer (GGUF), our loader (jaxtele folders)
  logits      max |dlogit| and mean KL(reference || artifact) on a fixed probe batch, within TOLERANCE of the
              artifact's precision
  merged      LoRA models: the merged in-memory model against the unmerged one on the same batch
  tokenizer   the artifact's tokenizer encodes the probe text to the same ids and decodes them back to the same
              text; same EOS id; same chat template
  generation  greedy decoding from a chat-templated probe stops at the template's end token within
              GEN_TOKENS tokens. Only where it means something: the tokenizer has a chat template and the
              source model itself stops (a random or pretrain-only model never does; then it is skipped).
A missing optional library (transformers, torch, peft) turns its check into a recorded skip, with our own
loader standing in where it can; it never crashes the export.
Legend: B probe rows, T probe tokens, V vocabulary.
"""

import importlib.metadata
import json
import os
import time

import numpy as np

from jaxtele.convert.reload import GEN_TOKENS, LOADERS, Artifact, jax_logits
from jaxtele.errors import JaxteleError

CERTIFICATE = "certificate.json"
PROBE_TOKENS = 64
CHAT_PROBE = "Answer with one word: what is the capital of France?"
BUILTIN_TEXT = (
    "The 5G System supports PDU sessions between the UE and a data network. The session management function "
    "selects a user plane function, allocates the UE's IP address and applies QoS rules received from the policy "
    "control function. During a handover the source gNB forwards buffered downlink data to the target gNB.",
    "The river runs through the old city, past the church and the market square, where people have gathered "
    "every Saturday for more than three hundred years. In the spring the school choir sings on the bridge, and "
    "in the winter the water sometimes freezes so hard that children skate from one bank to the other.")
# (max |dlogit|, mean KL in nats) by the precision the artifact stores; None: not checked. Measured margins:
# README "Export certificates".
TOLERANCE = {"exact": (1e-5, 1e-9), "float32": (5e-3, 1e-6), "float16": (0.15, 1e-4), "bfloat16": (1.0, 2e-3),
             "q8_0": (None, 1e-2)}
GGUF_PRECISION = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}
LIBRARIES = ("jax", "flax", "orbax-checkpoint", "numpy", "transformers", "tokenizers", "torch", "peft", "gguf",
             "safetensors")
ORDER = ("float32", "float16", "bfloat16")  # increasing rounding error


def versions() -> dict:
  out = {}
  for lib in LIBRARIES:
    try:
      out[lib] = importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
      out[lib] = None
  return out


def probe_text(cfg=None) -> tuple[str, str]:
  """Two probe texts: the first record of the run's first eval set (else a built-in telecom passage), and a
  built-in general-English passage."""
  text = BUILTIN_TEXT[0]
  sets = list(cfg.eval.sets) if cfg is not None and "eval" in cfg else []
  if sets and sets[0]["sources"]:
    from jaxtele.data.sources import make_source

    try:
      record = make_source(dict(sets[0]["sources"][0]), "eval.sets[0].sources[0]")[0]
      text = str(record.get("text") or text)[:2000]
    except (JaxteleError, OSError, KeyError, IndexError, TypeError):
      pass  # a set this machine cannot read: the built-in text still probes the export
  return text, BUILTIN_TEXT[1]


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref_BTV, got_BTV) -> dict:
  """max |dlogit| and mean over positions of KL(ref || got), in nats."""
  if np.shape(ref_BTV) != np.shape(got_BTV):
    return {"max_abs": float("inf"), "mean_kl": float("inf"), "shape": [list(np.shape(ref_BTV)), list(np.shape(got_BTV))]}
  lp, lq = log_softmax(ref_BTV), log_softmax(got_BTV)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  return {"max_abs": float(np.abs(np.asarray(ref_BTV, np.float64) - got_BTV).max()), "mean_kl": float(kl.mean())}


def within(numbers: dict, precision: str) -> tuple[bool, str]:
  max_tol, kl_tol = TOLERANCE[precision]
  numbers.update(tolerance={"precision": precision, "max_abs": max_tol, "mean_kl": kl_tol})
  if not np.isfinite(numbers["max_abs"]):
    return False, f"logits of shape {numbers.get('shape')}"
  if max_tol is not None and numbers["max_abs"] > max_tol:
    return False, f"max |dlogit| {numbers['max_abs']:.3g} > {max_tol:g} ({precision})"
  if numbers["mean_kl"] > kl_tol:
    return False, f"mean KL {numbers['mean_kl']:.3g} > {kl_tol:g} ({precision})"
  return True, ""


def model_precision(model) -> str:
  """The coarsest float dtype among the model's parameters and its compute dtype."""
  import jax
  from flax import nnx

  names = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if hasattr(x, "dtype")}
  names.add(str(model.config.dtype))
  return max((n for n in names if n in ORDER), key=ORDER.index, default="float32")


def coarser(*precisions) -> str:
  if "q8_0" in precisions:
    return "q8_0"
  return max(precisions, key=ORDER.index)


def end_token(tokenizer) -> int | None:
  """The special token the chat template writes after an assistant turn (else EOS)."""
  marker = "XyZzy"
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
  except Exception:  # a template that needs other roles or fields: fall back to EOS
    return tokenizer.eos_token_id
  special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
  tail = text.split(marker, 1)[1] if marker in text else ""
  return next((i for i in _encode(tokenizer, tail) if i in special), tokenizer.eos_token_id)


class Reference:
  """What the in-memory model says on the probe, taken once before any export merges its adapters."""

  def __init__(self, model, tokenizer, texts=None):
    from jaxtele.models.lora import lora_paths

    tic, cpu = time.time(), time.process_time()
    self.model, self.tokenizer = model, tokenizer
    self.texts = tuple(texts or BUILTIN_TEXT)
    vocab = model.config.vocab_size
    if tokenizer is not None:
      rows = [(_encode(tokenizer, t) * PROBE_TOKENS)[:PROBE_TOKENS] for t in self.texts]
      self.ids_BT = np.asarray(rows, np.int64)
    else:  # no tokenizer: fixed random ids still probe the weights
      self.ids_BT = np.random.default_rng(0).integers(0, vocab, (2, PROBE_TOKENS))
    if self.ids_BT.max() >= vocab:
      raise JaxteleError(f"certificate: the probe has token id {self.ids_BT.max()} >= the model's vocabulary {vocab}")
    self.lora = bool(lora_paths(model))
    self.precision = model_precision(model)
    self.logits = jax_logits(model, self.ids_BT)
    self.template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    self._stops = None
    self.seconds, self.cpu_seconds = time.time() - tic, time.process_time() - cpu

  def stops(self) -> bool:
    """Whether the source model itself ends its chat turn within GEN_TOKENS (one generation, once)."""
    if self._stops is None:
      from jaxtele.generation import chat_prompt_ids, greedy

      end = end_token(self.tokenizer)
      out = greedy(self.model, chat_prompt_ids(self.tokenizer, CHAT_PROBE), GEN_TOKENS, (end,))
      self._stops = end in out
    return self._stops




def artifact_precision(fmt: str, ref: Reference, dtype=None, quant="f16") -> str:
  if fmt == "jaxtele":
    return "exact"  # the parameter tree as it is, read back by the same code
  if fmt == "gguf":
    return coarser(GGUF_PRECISION[quant], ref.precision)
  stored = dtype or ref.model.config.param_dtype
  return coarser(stored if stored in ORDER else "float32", ref.precision)


def check_tokenizer(ref: Reference, tok) -> dict:
  src = ref.tokenizer
  if src is None:
    return {"status": "skipped", "why": "the source has no tokenizer"}
  if tok is None:
    return {"status": "fail", "why": "the artifact has no tokenizer"}
  out, why = {"status": "pass"}, ""
  for i, text in enumerate(ref.texts):
    want, got = _encode(src, text), _encode(tok, text)
    differ = sum(a != b for a, b in zip(want, got)) + abs(len(want) - len(got))
    back = tok.decode(got, skip_special_tokens=False)
    out[f"text{i}"] = {"ids": len(want), "ids_differ": differ, "roundtrip_equal": back == src.decode(want),
                       "roundtrip_exact": back == text}
    if differ and not why:
      why = f"text {i}: {differ} of {len(want)} ids differ from the source tokenizer's"
    elif back != src.decode(want) and not why:
      why = f"text {i}: decode(encode(text)) differs from the source tokenizer's"
  out["eos"] = [src.eos_token_id, tok.eos_token_id]
  if src.eos_token_id != tok.eos_token_id and not why:
    why = f"EOS id {tok.eos_token_id}, the source's is {src.eos_token_id}"
  out["chat_template"] = "same" if ref.template == getattr(tok, "chat_template", None) else \
      ("missing" if ref.template else "added")
  if ref.template and out["chat_template"] != "same" and not why:
    why = f"chat template {out['chat_template']} ({len(ref.template)} chars in the source)"
  if why:
    out.update(status="fail", why=why)
  return out


def check_generation(ref: Reference, art: Artifact) -> dict:
  """The artifact ends its chat turn: a pass needs no more. Only when it does not is the source model asked
  (one greedy decode through JAX, the costliest step of a certificate): if the source does not stop either
  (random or pretrain-only weights), there is nothing to hold the export to, and the check is skipped."""
  if not ref.template:
    return {"status": "skipped", "why": "the tokenizer has no chat template"}
  tok = art.tokenizer if art.tokenizer is not None and getattr(art.tokenizer, "chat_template", None) else None
  result = {}
  if tok is not None:
    from jaxtele.generation import chat_prompt_ids

    end = end_token(tok)
    out = art.generate(chat_prompt_ids(tok, CHAT_PROBE), (end,))
    result = {"end_token": end, "max_tokens": GEN_TOKENS, "generated": len(out), "stopped": end in out}
    if result["stopped"]:
      return result | {"status": "pass"}
  if not ref.stops():
    return result | {"status": "skipped", "why": f"the source model does not end a chat turn within {GEN_TOKENS} "
                                                 "tokens either (not chat-trained)"}
  if tok is None:
    return {"status": "fail", "why": "the artifact carries no chat template to prompt with"}
  return result | {"status": "fail", "why": f"no end token {result['end_token']} in {result['generated']} tokens "
                                            "(the source model stops)"}


def check_merged(ref: Reference, model, fmt: str) -> dict:
  """The in-memory model as merged for the export against the unmerged reference."""
  from jaxtele.models.lora import lora_paths

  if not ref.lora:
    return {"status": "skipped", "why": "no LoRA adapters"}
  if fmt == "adapter" or lora_paths(model):
    return {"status": "skipped", "why": f"the {fmt} format keeps the adapters unmerged"}
  numbers = compare(ref.logits, jax_logits(model, ref.ids_BT))
  ok, why = within(numbers, coarser("float32", ref.precision))
  return numbers | ({"status": "pass"} if ok else {"status": "fail", "why": why})


def _reload(fmt, folder, base, ref) -> tuple[Artifact, dict]:
  try:
    art = LOADERS[fmt](folder, base=base, tokenizer=ref.tokenizer)
  except Exception as e:  # what the user's library would raise on this artifact
    why = str(e) if isinstance(e, JaxteleError) else f"{type(e).__name__}: {(str(e) or ' ').splitlines()[0][:200]}"
    return None, {"status": "fail", "why": why.removeprefix("certificate: reload: ")}
  check = {"status": "pass", "loader": art.loader}
  for note in art.notes:
    check |= {"status": "skipped", "why": note.split(": ", 1)[1]}
  missing, unexpected = getattr(art, "missing", []), getattr(art, "unexpected", [])
  if missing or unexpected:
    check |= {"status": "fail", "missing_keys": missing, "unexpected_keys": unexpected,
              "why": f"{len(missing)} missing and {len(unexpected)} unexpected keys ({(missing or unexpected)[0]})"}
  return art, check


def certify(folder: str, fmt: str, ref: Reference, model, *, dtype=None, quant="f16", base="", log=print) -> dict:
  """Run the checks in order on the export in `folder` (temporary) and write `folder/certificate.json`; the first
  failed check raises one line naming it and its number (the caller then removes the folder)."""
  tic, cpu = time.time(), time.process_time()
  art, checks = None, {}

  def logits():
    numbers = compare(ref.logits, art.logits(ref.ids_BT))
    ok, why = within(numbers, artifact_precision(fmt, ref, dtype, quant))
    return numbers | ({"status": "pass"} if ok else {"status": "fail", "why": why})

  steps = (("logits", logits), ("merged_vs_unmerged", lambda: check_merged(ref, model, fmt)),
           ("tokenizer", lambda: check_tokenizer(ref, art.tokenizer) if fmt != "adapter" else
            {"status": "skipped", "why": "a PEFT adapter carries no tokenizer (its base does)"}),
           ("generation", lambda: check_generation(ref, art)))
  art, checks["reload"] = _reload(fmt, folder, base, ref)
  for name, run in steps:
    if checks[next(reversed(checks))]["status"] == "fail":
      break
    checks[name] = run()
  name, failed = next(reversed(checks.items()))
  if failed["status"] == "fail":
    raise JaxteleError(f"certificate: {name}: {failed['why']}; nothing was written (pass --no-verify to skip the "
                       "checks)")
  cert = {"format": fmt, "quant": quant if fmt == "gguf" else None, "passed": True,
          "probe": {"rows": int(ref.ids_BT.shape[0]), "tokens": int(ref.ids_BT.shape[1]),
                    "texts": [t[:80] for t in ref.texts]},
          "checks": checks, "seconds": round(time.time() - tic + ref.seconds, 2),
          "cpu_seconds": round(time.process_time() - cpu + ref.cpu_seconds, 2), "versions": versions()}
  write_certificate(folder, cert)
  skipped = [n for n, c in checks.items() if c["status"] == "skipped"]
  log(f"certified {fmt}: max |dlogit| {checks['logits']['max_abs']:.2g}, mean KL {checks['logits']['mean_kl']:.2g} "
      f"({cert['seconds']:.1f} s{'; skipped: ' + ', '.join(skipped) if skipped else ''})")
  return cert


def verify(folder: str, fmt: str, ref: Reference | None, model, log=print, **kw) -> dict:
  """`certify`, or with no reference (--no-verify, export.verify=False) a certificate saying nothing was checked."""
  if ref is not None:
    return certify(folder, fmt, ref, model, log=log, **kw)
  cert = {"format": fmt, "passed": None, "checks": {}, "skipped": "--no-verify", "versions": versions()}
  write_certificate(folder, cert)
  log(f"not verified ({fmt}): --no-verify; {CERTIFICATE} records that no check ran")
  return cert


def write_certificate(folder: str, cert: dict):
  with open(os.path.join(folder, CERTIFICATE), "w") as f:
    json.dump(cert, f, indent=2, default=float)
