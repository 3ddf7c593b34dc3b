"""Accelerator defaults: `auto` dtypes and attention resolved once, GPU XLA flags that never override the
user's, and the dry run's per-remat memory table."""

import io
import os
import subprocess
import sys

import pytest

from jaxtele.accelerator import cuda_expected, merge_flags, resolve_base_dtype, resolve_dtype, set_gpu_flags
from jaxtele.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.py")


def test_auto_dtypes():
  assert [resolve_dtype("auto", b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
  assert resolve_dtype("float32", "gpu") == "float32"
  assert resolve_base_dtype("auto", "auto", "gpu") == "bfloat16"
  assert resolve_base_dtype("auto", "float32", "gpu") == "float32"  # follows an explicit compute dtype
  assert resolve_base_dtype("auto", "bfloat16", "cpu") == "float32"
  assert resolve_base_dtype("bfloat16", "auto", "cpu") == "bfloat16"


def test_build_resolves_auto_before_the_model():
  from jaxtele import build

  cfg = load_config(TINY)
  assert cfg.model.dtype == "auto" and cfg.model.attention == "auto" and cfg.lora.base_dtype == "auto"
  mc = build.model_config(cfg.model)
  assert (mc.dtype, mc.attention) == ("float32", "xla")  # this CPU
  lora = load_config(TINY, ["--config.train.mode=lora"])
  _, _, frozen = build.abstract_split(lora)
  kernel = frozen["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert str(kernel.dtype) == "float32"


def test_gpu_flags_keep_the_users():
  merged, added = merge_flags("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d",
                              {"xla_gpu_enable_latency_hiding_scheduler": "true", "xla_gpu_x": "1"})
  assert merged == "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d --xla_gpu_x=1"
  assert added == ["--xla_gpu_x=1"]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAXTELE_COLLECTIVE_TIMEOUT": "120"}
  assert set_gpu_flags(env, force=True) == ["--xla_gpu_enable_latency_hiding_scheduler=true",
                                            "--xla_gpu_nccl_termination_timeout_seconds=120"]
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
  off = {"JAXTELE_XLA_DEFAULTS": "0"}
  assert set_gpu_flags(off, force=True) == [] and "XLA_FLAGS" not in off
  assert not cuda_expected({"JAX_PLATFORMS": "cpu"})


def test_gpu_flags_are_known_to_this_xla():
  """XLA aborts on an unknown flag in XLA_FLAGS, so every default must parse (checked on this jaxlib)."""
  env = {"JAXTELE_COLLECTIVE_TIMEOUT": "60"}
  set_gpu_flags(env, force=True)
  code = "import jax; jax.devices(); print('ok')"
  p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, XLA_FLAGS=env["XLA_FLAGS"]),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-500:]


def test_dry_run_memory_per_remat_policy(monkeypatch, tmp_path):
  """One compiled row per policy, each the sum of its parts, judged against the given device memory. (XLA's CPU
  compiler does not shrink temporaries under remat, see docs/benchmarks.md: the figures matter on GPU/TPU.)"""
  from jaxtele.plan import plan, remat_plan

  monkeypatch.chdir(tmp_path)
  cfg = load_config(TINY, ["--config.model.remat=full", "--config.model.init.num_layers=1",
                          "--config.data.seq_len=32"])
  out = io.StringIO()
  report = plan(cfg, out=out, remat_policies=("none", "full"), device_bytes=1)
  rows = report["remat"]
  assert set(rows) == {"none", "full"} and rows["full"] == report["per_device_total_bytes"]
  fixed = sum(v for k, v in report["per_device"].items() if k != "step_temporaries")
  # params, gradients and Adam's two moments: 4 fp32 copies of the parameters (one layer of the tiny recipe:
  # 27,040 by the hand count in test_config_rules, less one layer's 9,280), plus the optimizer's step counters
  assert 0 <= fixed - 4 * 4 * (27_040 - 9_280) <= 64
  assert rows["none"] > fixed
  text = out.getvalue()
  assert "by model.remat" in text and text.count("does not fit") == 2 and "<- model.remat" in text
  assert remat_plan("--dry_run_remat=48") == {"remat_policies": remat_plan("--dry_run_remat")["remat_policies"],
                                              "device_bytes": 48 * 2**30}
  with pytest.raises(Exception, match="GiB"):
    remat_plan("--dry_run_remat=lots")


@pytest.mark.parametrize("name", ["smollm2_135m_full_pretrain", "qwen25_1p5b_lora_pretrain"])
def test_gpu_recipes_run_on_3_or_8_gpus(name):
  """3x L40S (one node) and 8-GPU nodes: train and eval batches divide by the mesh's batch shards."""
  from jaxtele.config import validate
  from jaxtele.models.presets import PRESETS

  cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  model = PRESETS["smollm2-135m" if name.startswith("smollm2") else "qwen2.5-1.5b"]
  for devices in (1, 2, 3, 4, 6, 8):
    validate(cfg, model, devices)
  assert (cfg.model.dtype, cfg.model.remat) == ("auto", "none")
