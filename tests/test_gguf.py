"""GGUF in and out for llama, qwen2, qwen3, gemma, gemma2 and gemma3: our export (llama.cpp's layout) read back by
`transformers` (gguf_file=) and by our import, against the source `transformers` model; tokenizers from GGUF
metadata against transformers' own GGUF tokenizer; Llama 3.1 rope_freqs; refusals; the real SmolLM2 in q8_0."""

import os

import numpy as np
import pytest
import torch
import transformers

from jaxtele.convert import gguf, load_pretrained, load_tokenizer
from jaxtele.convert.gguf_export import save_gguf
from jaxtele.errors import JaxteleError

VOCAB = 300
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
# Settings a GGUF cannot carry to transformers (it reads neither query_pre_attn_scalar nor the layer pattern nor
# the local RoPE base) are left at transformers' defaults, which equal llama.cpp's conventions at head_dim 256.
ARCHS = {
    "llama": ("llama_untied", {}),
    "qwen2": ("qwen2_bias", {}),
    "qwen3": ("qwen3", dict(head_dim=128)),  # transformers' GGUF reader leaves qwen3 at head_dim 128
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)),
    "gemma3": ("gemma3", dict(head_dim=256, query_pre_attn_scalar=256, layer_types=None, final_logit_softcapping=None,
                              rope_parameters=None)),
}
TRANSFORMERS_READS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")  # transformers has no GGUF "gemma"


@pytest.fixture(scope="module")
def bpe_tokenizer():
  """A small byte-level BPE (289 tokens) with a special end-of-text token and a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(["the quick brown fox jumps over the lazy dog, 3GPP TS 38.331"] * 20,
                         trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                 chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory, make_hf_model, bpe_tokenizer):
  """(arch, transformers source model, our model, folder holding f32.gguf and f16.gguf and nothing else)."""
  name, overrides = ARCHS[request.param]
  ref = make_hf_model(name, vocab_size=VOCAB, **overrides)
  root = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(root / "hf")
  ours = load_pretrained(str(root / "hf")).model
  (root / "gguf").mkdir()
  for quant in ("f32", "f16"):
    save_gguf(ours, str(root / "gguf" / f"{quant}.gguf"), tokenizer=bpe_tokenizer, quant=quant)
  return request.param, ref, ours, root / "gguf"


def transformers_gguf(folder, file):
  return transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


def test_f32_gguf_import_equals_the_source(exported, hf_logits):
  arch, ref, _, folder = exported
  back = load_pretrained(str(folder / "f32.gguf")).model
  assert back.config.model_type == ref.config.model_type
  diff = np.abs(np.asarray(back(TOKENS)) - hf_logits(ref, TOKENS)).max()
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_transformers_reads_our_gguf_as_we_do(exported, quant, hf_logits):
  """transformers' GGUF reader (its own Q/K un-permutation and Gemma norm -1) and ours agree on the same file."""
  arch, _, _, folder = exported
  if arch not in TRANSFORMERS_READS:
    pytest.skip(f"transformers cannot load GGUF architecture {arch}")
  ours = np.asarray(load_pretrained(str(folder / f"{quant}.gguf")).model(TOKENS))
  diff = np.abs(hf_logits(transformers_gguf(folder, f"{quant}.gguf"), TOKENS) - ours).max()
  assert diff <= 1e-4, diff


def test_f16_export_is_close_to_the_source_in_transformers(exported, hf_logits):
  arch, ref, _, folder = exported
  if arch not in TRANSFORMERS_READS:
    pytest.skip(f"transformers cannot load GGUF architecture {arch}")
  want = hf_logits(ref, TOKENS)
  diff = np.abs(hf_logits(transformers_gguf(folder, "f16.gguf"), TOKENS) - want).max()
  # Llama/Qwen: 1e-3 absolute (measured 8e-4 to 9.4e-4). Gemma's sqrt(D)-scaled tied embedding (also the head) and
  # head_dim-256 q/k norms amplify f16 weight rounding: measured 1.3e-3 (gemma2) and 3.1e-3 (gemma3) of the largest
  # logit, bounded at 5e-3 of it; that the file holds the right weights is checked to 1e-4 in the test above.
  bound = 5e-3 * np.abs(want).max() if arch.startswith("gemma") else 1e-3
  assert diff <= bound, diff


def test_bpe_tokenizer_and_chat_template_survive(exported, bpe_tokenizer):
  arch, _, _, folder = exported
  ours = load_tokenizer(str(folder / "f16.gguf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="f16.gguf") \
      if arch in TRANSFORMERS_READS else bpe_tokenizer
  for text in ["the quick brown fox", "3GPP TS 38.331 jumps<|endoftext|>", "  lazy\n dog"]:
    want = bpe_tokenizer(text)["input_ids"]
    assert ours(text)["input_ids"] == want == theirs(text)["input_ids"], text
  assert ours.chat_template == bpe_tokenizer.chat_template and ours.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_sentencepiece_tokenizer_from_gguf_matches_transformers(tmp_path, arch, make_hf_model):
  """A SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`, scores, byte fallback) written by us and
  rebuilt by us equals transformers' GGUF tokenizer and the source tokenizer."""
  from transformers import GemmaTokenizer, LlamaTokenizer
  from transformers.tokenization_utils_base import generate_merges

  specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if arch == "gemma" else ["<unk>", "<s>", "</s>"]
  pieces = ["\u2581", "t", "h", "e", "q", "u", "i", "c", "k", "\u2581t", "he", "\u2581the", "\u2581q", "ui", "ck",
            "\u2581qui", "\u2581quick", "o", "x", "f", "\u2581f", "ox", "\u2581fox"]
  tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
  cls, kw = (GemmaTokenizer, dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")) \
      if arch == "gemma" else (LlamaTokenizer, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"))
  source = cls(vocab=vocab, merges=merges, **kw)
  # transformers reads Gemma tokenizers from gemma2/gemma3 GGUFs only (it has no GGUF "gemma").
  ref = make_hf_model("gemma2", vocab_size=len(tokens), **ARCHS["gemma2"][1]) if arch == "gemma" else \
      make_hf_model("llama_untied", vocab_size=len(tokens))
  model = load_pretrained_from(ref, tmp_path / "hf")
  save_gguf(model, str(tmp_path / "m.gguf"), tokenizer=source, quant="f32")
  ours = load_tokenizer(str(tmp_path / "m.gguf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  for text in ["the quick fox", "quick thé fox!", "  the"]:
    want = source(text)["input_ids"]
    assert ours(text)["input_ids"] == want == theirs(text)["input_ids"], text
    assert ours.decode(want, skip_special_tokens=True) == source.decode(want, skip_special_tokens=True)


def load_pretrained_from(ref, folder):
  ref.save_pretrained(folder)
  return load_pretrained(str(folder)).model


def test_llama31_rope_freqs_are_imported(tmp_path, make_hf_model, hf_logits, bpe_tokenizer):
  """A Llama 3.1-style GGUF: the RoPE scaling lives in `rope_freqs`; the import recovers the HF rope_parameters
  and the logits of the source model."""
  ref = make_hf_model("llama3_rope", vocab_size=VOCAB)
  model = load_pretrained_from(ref, tmp_path / "hf")
  save_gguf(model, str(tmp_path / "m.gguf"), tokenizer=bpe_tokenizer, quant="f32")
  reader, meta = gguf.open_gguf(str(tmp_path / "m.gguf"))
  assert "rope_freqs.weight" in {t.name for t in reader.tensors}
  back = load_pretrained(str(tmp_path / "m.gguf")).model
  want = {k: v for k, v in ref.config.rope_parameters.items()}
  assert back.config.rope == {k: v for k, v in want.items() if k != "rope_theta"}
  diff = np.abs(np.asarray(back(TOKENS)) - hf_logits(ref, TOKENS)).max()
  assert diff <= 1e-4, diff
  with pytest.raises(JaxteleError, match="rope_freqs match no llama3 RoPE scaling"):
    gguf.llama3_rope_from_factors(np.linspace(1, 3, 8), 500000.0, 16, "x.gguf")


def test_unsupported_architecture_and_quant_are_refused(tmp_path, make_hf_model, bpe_tokenizer):
  import gguf as gguf_lib

  w = gguf_lib.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(JaxteleError, match=r"phi.gguf: GGUF architecture 'phi3' is not supported \(supported: llama, "
                                         r"qwen2, qwen3, gemma, gemma2, gemma3\)"):
    load_pretrained(str(tmp_path / "phi.gguf"))
  model = load_pretrained_from(make_hf_model("llama_tied", vocab_size=VOCAB), tmp_path / "hf")
  with pytest.raises(JaxteleError, match=r"--quant: cannot write 'q4_k' \(choose from f32, f16, bf16, q8_0\)"):
    save_gguf(model, str(tmp_path / "m.gguf"), tokenizer=bpe_tokenizer, quant="q4_k")
  from jaxtele.export import main

  with pytest.raises(SystemExit) as e:
    main(["--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--format", "gguf", "--quant", "q4_k"])
  assert e.value.code == 2 and not os.path.exists(tmp_path / "out")


def test_cli_exports_a_lora_run_merged(lora_export_run, tmp_path, hf_logits):
  """`python -m jaxtele.export --format gguf` from a LoRA run directory: the GGUF transformers loads equals the
  run's merged HF export."""
  from jaxtele.export import main

  run = lora_export_run
  main(["--source", str(run), "--out", str(tmp_path / "g"), "--format", "gguf", "--quant", "f32"])
  assert sorted(os.listdir(tmp_path / "g")) == ["certificate.json", "model.gguf"]
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(run / "export" / "merged"), dtype=torch.float32)
  theirs = transformers_gguf(tmp_path / "g", "model.gguf")
  tokens = np.random.default_rng(0).integers(3, 200, size=(2, 24))
  np.testing.assert_allclose(hf_logits(theirs, tokens), hf_logits(merged.eval(), tokens), atol=1e-4)


@pytest.mark.slow
def test_smollm2_gguf_to_q8_0_keeps_wikitext_perplexity(smollm2, tmp_path, shared_data):
  """SmolLM2 GGUF -> jaxtele -> GGUF q8_0 -> transformers: perplexity on 4 x 128 WikiText-2 tokens within 2% of
  the source model's (ours on the source GGUF)."""
  text = open(os.path.join(shared_data, "wikitext2", "wiki.test.raw"), encoding="utf-8").read()
  ids = np.asarray(smollm2.tokenizer(text[:200_000])["input_ids"][:4 * 128 + 1])
  assert len(ids) == 513
  rows = np.stack([ids[i * 128:(i + 1) * 128 + 1] for i in range(4)])
  save_gguf(smollm2.model, str(tmp_path / "m.gguf"), tokenizer=smollm2.tokenizer, quant="q8_0")
  theirs = transformers_gguf(tmp_path, "m.gguf")

  def ppl(logits):
    logits = logits[:, :-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return float(np.exp(-np.take_along_axis(logp, rows[:, 1:, None], -1).mean()))

  with torch.no_grad():
    exported = ppl(theirs(torch.as_tensor(rows)).logits.numpy())
  source = ppl(np.asarray(smollm2.model(rows)))
  assert abs(exported / source - 1) <= 0.02, (source, exported)
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")(text[:500])["input_ids"] == \
      smollm2.tokenizer(text[:500])["input_ids"]
