"""Fused attention kernels on a device mesh: each device runs the kernel on its own rows and heads.

Under `jit` an opaque kernel (a Pallas or FFI custom call, or an interpreted Pallas grid) has no partitioning
rule, so XLA all-gathers q/k/v, runs the kernel on the global batch on every device and slices the result:
correct values, N x the work. `shard_map` makes the split explicit. The mesh comes from JAX's mesh context
(`jax.set_mesh`, entered by the trainer and the dry run), read at trace time as an abstract mesh, so nothing
is threaded through the model and no device is queried while tracing. Without a mesh context (or on a
mesh of one device) the kernel is called as it is.

The rule (`split`):
- rows over the batch axes (`data`, `fsdp`) whose sizes are > 1; the batch must divide by their product
  (the config validation already requires it);
- heads over `tensor` when it divides the query heads N. If it also divides the kv heads K, each device
  keeps its K / tensor kv heads (contiguous query-head blocks share contiguous kv-head blocks). If it does
  not (e.g. SmolLM2's 3 kv heads on tensor=2), k/v are repeated to N heads first: the sharding rules left
  k_proj/v_proj replicated over `tensor` in that case, so the repeat and the split are local slices;
- a tensor axis that does not divide N leaves attention replicated over `tensor` (each tensor rank computes
  every head of its rows), as the sharding rules already replicate q_proj then.
Shape letters: jaxtele/models/__init__.py.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtele.errors import JaxteleError

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def context_mesh():
  """The abstract mesh of the enclosing `jax.set_mesh` (None without one); safe to call while tracing."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def split(mesh_shape: dict, B: int, N: int, K: int):
  """-> (batch axes, head axis or None, repeat_kv): how q/k/v [B, T, heads, H] are split over the mesh."""
  batch_axes = tuple(a for a in BATCH_AXES if mesh_shape.get(a, 1) > 1)
  shards = 1
  for a in batch_axes:
    shards *= mesh_shape[a]
  if B % shards:
    raise JaxteleError(f"attention: batch {B} is not divisible by the mesh's batch shards "
                       f"({' x '.join(f'{a}={mesh_shape[a]}' for a in batch_axes)})")
  t = mesh_shape.get(HEAD_AXIS, 1)
  if t <= 1 or N % t:
    return batch_axes, None, False
  return batch_axes, HEAD_AXIS, K % t != 0


def sharded(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, mesh=None):
  """`kernel(q, k, v, segment_ids)` under `shard_map` over the context mesh, by the rule above."""
  mesh = mesh if mesh is not None else context_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  B, _, N, _ = q_BTNH.shape
  batch_axes, head_axis, repeat_kv = split(dict(mesh.shape), B, N, k_BSKH.shape[2])
  if repeat_kv:
    G = N // k_BSKH.shape[2]
    k_BSKH, v_BSKH = jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKH, G, axis=2)
  rows = batch_axes or None
  heads_spec, rows_spec = P(rows, None, head_axis, None), P(rows, None)
  # check_vma=False: Pallas calls carry no varying-mesh-axis types; every output is per-shard by construction.
  fn = jax.shard_map(kernel, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, rows_spec),
                     out_specs=heads_spec, check_vma=False)
  return fn(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
