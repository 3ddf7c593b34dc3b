"""Every recipe in configs/ loads, passes validation against its model, and says what its issue asks."""

import os

import pytest

from jaxtele.config import load_config, validate
from jaxtele.convert import model_config, smollm2_gguf_path
from jaxtele.models.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN25_1P5B = ModelConfig.from_hf({
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "tie_word_embeddings": True})


def recipe(name, *overrides):
  return load_config(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


@pytest.mark.parametrize("devices", [1, 8])
def test_smollm2_full_pretrain(devices):
  cfg = recipe("smollm2_135m_full_pretrain")
  validate(cfg, model_config(smollm2_gguf_path()), devices)
  assert cfg.data.seq_len == 2048 and cfg.data.seq_len * cfg.data.batch_size == 245_760
  o = cfg.optimizer
  assert (o.schedule, o.warmup_ratio, o.lr, o.weight_decay, o.clip) == ("cosine", 0.03, 1e-4, 0.01, 1.0)
  assert cfg.train.mode == "full"


def test_qwen25_lora_pretrain():
  cfg = recipe("qwen25_1p5b_lora_pretrain")
  validate(cfg, QWEN25_1P5B, 8)
  assert (cfg.train.mode, cfg.lora.rank, cfg.lora.alpha) == ("lora", 64, 128.0)
  assert set(cfg.lora.targets.split(",")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}


def test_smollm2_lora_sft():
  cfg = recipe("smollm2_135m_lora_sft")
  validate(cfg, model_config(smollm2_gguf_path()), 8)
  assert (cfg.train.mode, cfg.lora.rank, cfg.lora.alpha) == ("lora", 16, 32.0)
  assert (cfg.data.format, cfg.data.sft_template) == ("sft", "alpaca")


def test_quickstart_and_overrides(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = recipe("quickstart", "--config.optimizer.lr=3e-4", "--config.train.steps=7", "--config.lora.targets=q_proj")
  assert (cfg.optimizer.lr, cfg.train.steps, cfg.lora.targets) == (3e-4, 7, "q_proj")
  from jaxtele.models.build import model_config as run_model_config

  validate(cfg, run_model_config(cfg.model), 8)
  assert os.path.exists(cfg.data.sources[0]["path"])  # the corpus is generated, not shipped
