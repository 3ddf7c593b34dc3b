"""MFU accounting against FLOPs counted by hand, the device peak table, metrics.jsonl written and read back (rows
and key names written out by hand here), and the progress line."""

import io
import json

import pytest

from jaxtele import metrics
from jaxtele.errors import JaxteleError
from jaxtele.metrics import PEAK_BF16_FLOPS, flops_per_token
from jaxtele.progress import Progress
from jaxtele.models.config import ModelConfig

# D=8, F=16, 2 layers, 2 heads and 1 kv head of 4, vocab 10.
SMALL = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4)


def test_full_fine_tuning_flops_by_hand():
  # Matmul weights per layer: q 8x8=64, k 8x4=32, v 32, o 64, gate/up/down 3 x 8x16=384 -> 576; x2 layers
  # = 1152, plus the head 8x10 = 80 -> N = 1232. Training = 3 x (forward 2N) = 6N = 7392.
  # Attention per token per layer, forward: QK^T and PV are each 2 x T x H x Q FLOPs = 2 x 2 x 16 x 2 x 4 = 512
  # at T=16, halved by the causal mask = 256; x3 for training = 768, x2 layers = 1536.
  assert flops_per_token(SMALL, 16, "full") == 7392 + 1536


def test_lora_flops_by_hand():
  # Frozen base: forward 2N + activation gradients 2N = 4N = 4928; 100 adapter parameters train fully: 6 x 100.
  assert flops_per_token(SMALL, 16, "lora", adapter_params=100) == 4928 + 600 + 1536


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200", 989e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                       ("TPU v5", 459e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_table_tells_parts_apart(kind, peak):
  assert next(f for name, f in PEAK_BF16_FLOPS if name.lower() in kind.lower()) == peak


def test_key_names_as_the_run_directory_spells_them():
  assert metrics.train_key("loss") == metrics.TRAIN_LOSS == "train/loss"
  assert metrics.eval_key("3gpp/held", "ppl") == "eval/3gpp/held/ppl"
  assert metrics.eval_set_of("eval/3gpp/held/ppl", "ppl") == "3gpp/held"
  assert metrics.eval_set_of("eval/wiki/loss", "ppl") is None and metrics.eval_set_of("eval//ppl", "ppl") is None
  assert metrics.forget_key("domain_bpb") == "forget/domain_bpb"
  rows = [{"train/grad_norm": 1.0, "train/grad_norm/lora_b": 2.0, "train/grad_norm_x": 3.0},
          {"train/grad_norm/lora_magnitude": 4.0}]
  assert metrics.grad_keys(rows) == ["train/grad_norm", "train/grad_norm/lora_b", "train/grad_norm/lora_magnitude"]
  assert [metrics.grad_key_group(k) for k in metrics.grad_keys(rows)] == ["", "lora_b", "lora_magnitude"]


def test_read_metrics_merges_a_step_and_keeps_the_later_values(tmp_path):
  lines = [{"step": 2, "train/loss": 3.0}, {"step": 1, "train/loss": 4.0},
           {"step": 2, "eval/wiki/ppl": 9.0, "tokens_seen": 64}, {"step": 2, "train/loss": 2.5}]  # resumed at 2
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
  assert metrics.read_metrics(str(tmp_path)) == [
      {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 2.5, "eval/wiki/ppl": 9.0, "tokens_seen": 64}]
  assert metrics.read_metrics(str(tmp_path / "none")) == []
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n')
  with pytest.raises(JaxteleError, match=r"metrics.jsonl:2: malformed JSON line"):
    metrics.read_metrics(str(tmp_path))


def test_writer_rows_read_back(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write(3, {"train/loss": 1.5, "train/mfu": None}, index={"tokens_seen": 96})
  w.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "tokens_seen": 96, "train/loss": 1.5}
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 3, "tokens_seen": 96, "train/loss": 1.5}]


def test_progress_line(monkeypatch):
  clock = iter([100.0, 101.0, 102.0, 110.0])
  monkeypatch.setattr("jaxtele.progress.time.time", lambda: next(clock))
  out = io.StringIO()
  p = Progress("perplexity wiki", 20, "batches", every=5.0, stream=out, first=0)
  p(2)  # 1 s after the start: too soon, not printed
  p(4)  # 2 s: still too soon
  p(20, "done")  # the end is always printed: 20 batches in 10 s
  assert out.getvalue() == "perplexity wiki: 20/20 batches, 2.0 batches/s, done\n"
  out = io.StringIO()
  monkeypatch.setattr("jaxtele.progress.time.time", lambda: 50.0)
  Progress("sweep", 4, "points", every=0, stream=out, rate=False)(2, "running lora/a")
  assert out.getvalue() == "sweep: 2/4 points, running lora/a\n"
