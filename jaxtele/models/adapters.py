"""Adapter leaves and how they shard: each leaf's axes in terms of its kernel's (`in`, `out`).

`sharding` reads `LEAF_AXES`, so an adapter's leaves follow the spec of the kernel they sit beside
without rules of their own.
"""

LEAF_AXES = {"lora_a": ("in", None), "lora_b": (None, "out")}
