"""Device mesh and partition rules.

One set of regex rules maps a leaf's path to a PartitionSpec over the mesh axes (`data`, `fsdp`,
`tensor`). Rules match the end of the path, so they apply unchanged to parameters and to the
optimizer's moments (whose paths end with the parameter's). An axis that does not divide a dimension
is dropped from that dimension, so tiny models still run on big meshes.
"""

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtele.errors import JaxteleError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined path, spec). First match wins; kernels are [in, out].
RULES = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/kernel$", P("fsdp", "tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/bias$", P("fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/lora_a$", P("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/lora_b$", P(None, "tensor")),
    (r"(o_proj|down_proj)/lora_a$", P("tensor", None)),
    (r"(o_proj|down_proj)/lora_b$", P(None, "fsdp")),
)


def mesh_shape(shape: dict, n_devices: int) -> dict:
  """Axis sizes for (data, fsdp, tensor); one size may be -1 (the rest of the devices)."""
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise JaxteleError("config: mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise JaxteleError(f"config: mesh: {n_devices} devices are not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise JaxteleError(f"config: mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, found {n_devices}")
  return dict(zip(AXES, sizes))


def make_mesh(shape: dict, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  sizes = list(mesh_shape(shape, len(devices)).values())
  # Auto axes: with Explicit axes (the default of jax.make_mesh in recent JAX) FSDP matmuls fail to shard.
  return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def spec_for(path: str, shape, mesh: Mesh) -> P:
  for pattern, spec in RULES:
    if re.search(pattern, path):
      dims = list(spec) + [None] * (len(shape) - len(spec))
      return P(*(ax if ax and shape[i] % mesh.shape[ax] == 0 else None for i, ax in enumerate(dims[:len(shape)])))
  return P()


def tree_shardings(tree, mesh: Mesh):
  """NamedSharding for every array leaf of `tree` (params, optimizer state...), by its path."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(path_str(path), shape, mesh) if shape else P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Each process's rows -> global jax Arrays sharded over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
