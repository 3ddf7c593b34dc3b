"""Architectures by name, for benchmarks and planning without weights (shapes from the published configs)."""

from jaxtele.models.config import ModelConfig

PRESETS = {
    "smollm2-135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-1.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                                rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                                qkv_bias=True),
    "tiny": ModelConfig(model_type="llama", vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=4096),
}
