"""SmolLM2-135M (from the GGUF), LoRA on a few 3GPP clauses for a handful of steps: their loss drops."""

import json
import os

import pytest

from jaxtele.config import default_config
from jaxtele.convert import smollm2_gguf_path
from jaxtele.data import threegpp

pytestmark = pytest.mark.slow


def test_lora_on_3gpp_clauses_lowers_their_loss(shared_data, tmp_path):
  from jaxtele.train import run

  clauses = threegpp.read_specs_file(os.path.join(shared_data, "3gpp", "37.324_SDAP_j00.md"))[:6]
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": c.text[:600]}) + "\n" for c in clauses))
  cfg = default_config()
  cfg.run_dir = str(tmp_path / "run")
  cfg.model.source = smollm2_gguf_path()
  cfg.data.sources = [{"type": "jsonl", "path": str(docs)}]
  cfg.data.update(seq_len=64, batch_size=8, packing="concat")  # half the tokens of 128: compute is most of it
  cfg.eval.sets = [{"name": "sdap", "sources": [{"type": "jsonl", "path": str(docs)}]}]
  cfg.eval.update(at_start=True, batch_size=8, max_batches=1)
  cfg.train.update(mode="lora", steps=4, log_every=1)  # eval loss 4.69 -> 3.89 here (bar: 0.1)
  cfg.lora.update(rank=8, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj")
  cfg.optimizer.update(lr=2e-3, warmup_ratio=0.0, schedule="constant")
  cfg.mesh.update(data=-1, fsdp=1)
  cfg.checkpoint.update(every=100, async_save=False)
  res = run(cfg)
  before, after = res["eval_start"]["eval/sdap/loss"], res["eval"]["eval/sdap/loss"]
  print(f"SmolLM2-135M LoRA on 6 TS 37.324 clauses: loss {before:.3f} -> {after:.3f} in {cfg.train.steps} steps")
  assert after < before - 0.1
