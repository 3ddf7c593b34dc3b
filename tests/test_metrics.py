"""MFU accounting against FLOPs counted by hand, and the device peak table."""

import pytest

from jaxtele.metrics import PEAK_BF16_FLOPS, flops_per_token
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
