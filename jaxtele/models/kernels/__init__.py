"""Fused attention kernels behind `jaxtele.models.attention.attention` (cuDNN, Pallas Triton, Pallas splash)."""
