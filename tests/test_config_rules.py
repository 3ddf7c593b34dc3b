"""Configuration: every key has a rule and each rule refuses what it must, naming the key and what is allowed;
recipe errors name file:line; `--dry_run` prints counts that match a hand count."""

import os
import subprocess
import sys

import pytest

from jaxtele.config import RULES, check_rules, default_config, leaves, load_config, split_argv
from jaxtele.errors import JaxteleError
from jaxtele.eval import config as eval_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.py")


def bad_value(rule):
  """A value the rule must refuse, and the words its error must contain."""
  if rule.choices:
    return "no-such-choice", "is not one of " + ", ".join(map(str, rule.choices))
  if rule.kind is bool:
    return 3, "expected bool"
  if rule.kind in (tuple, str):
    return 7, f"expected {rule.kind.__name__}"
  if rule.lo is not None:
    value = rule.lo if rule.lo_open else rule.lo - 1
    return (float(value) if rule.kind is float else int(value)), f"must be {'>' if rule.lo_open else '>='} {rule.lo}"
  return "x", "expected"


SCHEMAS = {"train": (default_config, RULES, check_rules),
           "eval": (eval_config.default_config, eval_config.RULES, eval_config.check_rules)}


@pytest.mark.parametrize("which", sorted(SCHEMAS))
def test_every_key_has_a_rule(which):
  defaults, rules, _ = SCHEMAS[which]
  assert sorted(leaves(defaults())) == sorted(rules)


@pytest.mark.parametrize("which,key", [(w, k) for w in sorted(SCHEMAS) for k in sorted(SCHEMAS[w][1])])
def test_each_rule_refuses_a_bad_value(which, key):
  defaults, rules, check_rules = SCHEMAS[which]
  cfg = defaults()
  value, words = bad_value(rules[key])
  *parents, leaf = key.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(JaxteleError, match=f"config: {key}: ") as e:
    check_rules(cfg)
  assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("--config.optimizer.lr=-1.0", "config: optimizer.lr: must be > 0.0, got -1.0"),
    ("--config.optimizer.warmup_ratio=1.0", "config: optimizer.warmup_ratio: must be < 1.0, got 1.0 (allowed: [0.0, 1.0))"),
    ("--config.optimizer.clip=-0.5", "config: optimizer.clip: must be >= 0.0, got -0.5"),
    ("--config.optimizer.b2=1.0", "config: optimizer.b2: must be < 1.0"),
    ("--config.data.batch_size=0", "config: data.batch_size: must be >= 1, got 0"),
    ("--config.optimizer.lr=nan", "config: optimizer.lr: must be finite"),
    ("--config.mesh.fsdp=0", "config: mesh.fsdp: must be -1"),
    ("--config.model.remat=sometimes", "config: model.remat: 'sometimes' is not one of none, full"),
])
def test_numeric_nonsense_is_refused_on_load(override, message):
  with pytest.raises(JaxteleError) as e:
    load_config(TINY, [override])
  assert message in str(e.value)


def test_unknown_keys_and_unparsable_values_name_the_key():
  with pytest.raises(JaxteleError, match=r"^config: unknown key 'optimizer.lrr'$"):
    load_config(TINY, ["--config.optimizer.lrr=1.0"])
  with pytest.raises(JaxteleError, match=r"^config: train.steps: cannot parse 'many'"):
    load_config(TINY, ["--config.train.steps=many"])


def test_argv_helper_takes_overrides_with_or_without_a_separator():
  """The one parser of train, eval and data inspect: `--config FILE`, overrides anywhere, `--` passed over."""
  want = {"config": "r.py", "overrides": ["--config.a=1", "--config.b.c=x y"], "--out": "o"}
  assert split_argv(["--config", "r.py", "--config.a=1", "--", "--config.b.c=x y", "--out", "o"],
                    options=("--out",)) == want
  assert split_argv(["--config.a=1", "--out=o", "--config=r.py", "--config.b.c=x y"], options=("--out",)) == want
  for argv, words in ((["--config", "r.py", "--out", "o"], "unknown argument '--out'"),
                      (["--config.a=1"], "--config: required"), (["--config"], "--config: needs a value"),
                      (["--config", "r.py", "--config.a"], "unknown argument '--config.a'")):
    with pytest.raises(JaxteleError, match=words) as e:
      split_argv(argv)
    assert "\n" not in str(e.value)


def test_model_refusals_are_named_by_the_key_that_chose_them():
  """The model package's errors name no config key; validation refuses the same things first, by key."""
  from jaxtele.config import check_model_runtime
  from jaxtele.models.config import ModelConfig

  cfg = default_config()
  with pytest.raises(JaxteleError, match=r"^config: model.remat: offload_dots needs a GPU or TPU \(host offload\), "
                                         r"not cpu$"):
    check_model_runtime(cfg, ModelConfig(remat="offload_dots"), backend="cpu")
  check_model_runtime(cfg, ModelConfig(remat="offload_dots"), backend="gpu")
  with pytest.raises(JaxteleError, match=r"^config: model.attention: cudnn needs a CUDA GPU, but the JAX backend "
                                         r"is 'cpu'$"):
    check_model_runtime(cfg, ModelConfig(attention="cudnn", dtype="bfloat16"), backend="cpu")
  cfg.train.loss = "chunked"
  check_model_runtime(cfg, ModelConfig(), backend="cpu")
  with pytest.raises(JaxteleError, match=r"^config: train.loss: chunked cannot apply gemma2's final soft-capping "
                                         r"\(final_logit_softcapping=30.0\); use train.loss=plain$"):
    check_model_runtime(cfg, ModelConfig(model_type="gemma2", final_softcap=30.0), backend="cpu")


def test_negative_lr_stops_the_cli_before_anything_heavy(tmp_path):
  p = subprocess.run([sys.executable, "-m", "jaxtele.train", "--config", TINY, "--config.optimizer.lr=-1.0"],
                     cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
      "error: config: optimizer.lr: must be > 0.0, got -1.0"
  assert not (tmp_path / "runs").exists()


def test_syntax_error_in_a_recipe_names_file_and_line(tmp_path):
  recipe = tmp_path / "broken.py"
  recipe.write_text("from jaxtele.config import default_config\n\n\ndef get_config():\n  cfg = default_config(\n"
                    "  return cfg\n")
  p = subprocess.run([sys.executable, "-m", "jaxtele.train", "--config", str(recipe)], cwd=tmp_path,
                     capture_output=True, text=True, timeout=120)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, p.stderr
  assert lines[0].startswith("error: broken.py:5: syntax error:") or lines[0].startswith(f"error: {recipe}:5:"), lines


def test_an_exception_in_a_recipe_names_file_and_line(tmp_path):
  recipe = tmp_path / "raises.py"
  recipe.write_text("from jaxtele.config import default_config\n\n\ndef get_config():\n  cfg = default_config()\n"
                    "  cfg.train.steps = 1 // 0\n  return cfg\n")
  with pytest.raises(JaxteleError, match=r"raises\.py:6: ZeroDivisionError"):
    load_config(str(recipe))


def tiny_param_count() -> int:
  """By hand, for configs/tiny_test.py: vocab 264, D 32, F 64, 2 layers, 4 heads and 2 kv heads of 8, tied."""
  D, F, V, H = 32, 64, 264, 8
  attention = D * 4 * H + D * 2 * H + D * 2 * H + 4 * H * D
  mlp = 3 * D * F
  per_layer = attention + mlp + 2 * D  # two RMSNorm scales
  return 2 * per_layer + V * D + D  # embedding (tied head) + final norm


def dry_run(cwd, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-m", "jaxtele.train", *args, "--dry_run"], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout


def test_dry_run_counts_match_a_hand_count(tmp_path):
  out = dry_run(tmp_path, "--config", TINY)
  n = tiny_param_count()
  assert f"parameters: {n:,} trainable / {n:,} total (full)" in out
  assert f"optimizer state: {2 * n * 4 / 2**20:,.1f} MiB" in out  # Adam: two fp32 moments per parameter
  assert "memory per device:" in out and "step_temporaries" in out and "optimizer.lr = 0.003" in out
  r = 4
  lora = 2 * (r * (32 + 4 * 8) + r * (32 + 2 * 8) * 2 + r * (4 * 8 + 32) + 2 * r * (32 + 64) + r * (64 + 32))
  out = dry_run(tmp_path, "--config", TINY, "--config.train.mode=lora", f"--config.lora.rank={r}")
  assert f"parameters: {lora:,} trainable / {n + lora:,} total (lora)" in out
  assert not (tmp_path / "runs").exists()  # nothing written, nothing loaded


@pytest.mark.parametrize("recipe", ["quickstart", "smollm2_135m_full_pretrain", "smollm2_135m_lora_sft",
                                    "qwen25_1p5b_lora_pretrain"])
def test_dry_run_on_each_recipe(tmp_path, monkeypatch, capsys, recipe):
  """Every recipe plans from its architecture alone (sources replaced by the SmolLM2 GGUF's config where a
  recipe names a hub id or a run's export). The step is not compiled here (the CLI test above does that)."""
  from jaxtele.convert import smollm2_gguf_path
  from jaxtele.plan import plan

  args = []
  if recipe.startswith("smollm2"):
    args.append(f"--config.model.source={smollm2_gguf_path()}")
  if recipe.startswith("qwen"):
    args += ["--config.model.source=", "--config.model.tokenizer=bytes", "--config.model.init.model_type=qwen2",
             "--config.model.init.vocab_size=151936", "--config.model.init.hidden_size=1536",
             "--config.model.init.intermediate_size=8960", "--config.model.init.num_layers=28",
             "--config.model.init.num_heads=12", "--config.model.init.num_kv_heads=2",
             "--config.model.init.head_dim=128", "--config.model.init.qkv_bias=True",
             "--config.model.init.max_position_embeddings=32768", "--config.data.seq_len=256",
             "--config.data.batch_size=8"]
  elif recipe != "quickstart":
    args += ["--config.data.seq_len=256", "--config.data.batch_size=8"]
  monkeypatch.chdir(tmp_path)
  plan(load_config(os.path.join(ROOT, "configs", f"{recipe}.py"), args), compile_step=False)
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("parameters:"))
  trainable, total = (int(x.replace(",", "")) for x in line.split()[1::3][:2])
  assert 0 < trainable <= total
  if recipe.startswith("qwen"):  # Qwen2.5-1.5B: 1,543,714,304 parameters (tied embeddings)
    assert total - trainable == 1_543_714_304
    assert trainable == 28 * 64 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 2 * (1536 + 8960) + (8960 + 1536))
  if recipe == "smollm2_135m_full_pretrain":
    assert total == 134_515_008
