"""The decoder, its attention, adapters and NF4 base: knows nothing of the trainer's config (errors name no
config key; the build and config layers name them).

Shape letters, one meaning each across jaxtele; an array's name ends in its axes (`x_BTD`, `kernel_IO`):
  B batch rows             T query / row length       S key length (KV cache slots)
  D model (hidden) dim     F MLP (intermediate) dim   V vocabulary
  N query heads            K kv heads                 G query heads per kv head (N // K)
  H head dim               E rotary frequencies (H // 2)
  L layers                 P scan period (layers)     Y scanned groups of P layers
  I in features            O out features             R adapter rank
  J in features padded to NF4 blocks                  Q NF4 blocks (J / 64)
  X batch shards           W chunked-loss tiles       C positions per chunked-loss tile
  M adapters merged        A candidate next tokens    U paired units (items, documents)
  Z bootstrap replicates
"""
