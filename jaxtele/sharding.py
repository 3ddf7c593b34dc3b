"""Device mesh and sharding rules: parameter paths -> logical axes -> mesh axes.

`PARAM_AXES` names the logical axes of every parameter by the end of its path (kernels are [in, out]);
`LOGICAL_TO_MESH` is the one table that maps logical axes onto the mesh (`data`, `fsdp`, `tensor`).
Rules match the end of the path, so they apply unchanged to the optimizer's moments (whose paths end with
the parameter's). Leaves an adapter or the NF4 storage declares (`models.leaves`) take their axes from the
kernel they sit beside.

Loud by design: a parameter of rank >= 2 that no rule names is an error, and a mesh axis that cannot divide
a dimension (for `heads` / `kv_heads`: the number of heads, so tensor parallelism splits whole heads) leaves
that dimension replicated and is reported once, by parameter, when the shardings are made.
"""

import collections
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtele.errors import JaxteleError
from jaxtele.models import leaves

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the end of the '/'-joined path, logical axes). First match wins.
PARAM_AXES = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"q_proj/kernel$", ("embed", "heads")),
    (r"(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"o_proj/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"q_proj/bias$", ("heads",)),
    (r"(k_proj|v_proj)/bias$", ("kv_heads",)),
    (r"(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"(o_proj|down_proj)/bias$", ("embed",)),
    (r"norm/scale$", ("norm",)),
)

# Logical axis -> mesh axis (None: replicated). FSDP shards the model dimension of every matrix; tensor
# parallelism splits heads, the MLP's hidden dimension and the vocabulary.
LOGICAL_TO_MESH = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                   "norm": None}


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


def _rule(path: str):
  return next((axes for pattern, axes in PARAM_AXES if re.search(pattern, path)), None)


def logical_axes(path: str, ndim: int) -> tuple | None:
  """The logical axes of a leaf, or None if no rule names it."""
  axes = _rule(path)
  declared = leaves.spec(path) if axes is None else None
  if declared is not None:
    # A declared leaf: find the kernel of the linear layer it belongs to, and map `in` / `out` onto its axes.
    parts = path.split("/")[:-1]
    for i in range(len(parts), 0, -1):
      kernel = _rule("/".join(parts[:i]) + "/kernel")
      if kernel is not None:
        role = dict(zip(("in", "out"), kernel))
        axes = tuple(role.get(a) if a else None for a in declared.axes)
        break
  if axes is not None and len(axes) != ndim:
    raise JaxteleError(f"sharding: {path}: rank {ndim} but its rule names {len(axes)} axes {axes}")
  return axes


def parameter_name(path: str) -> str:
  """'opt_state/1/0/mu/layers/3/self_attn/q_proj/kernel' -> 'layers/*/self_attn/q_proj/kernel': the parameter a
  leaf belongs to (its moments included), layer indices folded."""
  match = re.search(r"(embed_tokens|layers|norm|lm_head)(/.*)?$", path)
  return re.sub(r"/\d+/", "/*/", match.group(0) if match else path)


class Shardings:
  """Makes NamedShardings by rule for one mesh and one model, and remembers what it could not split."""

  def __init__(self, mesh: Mesh, num_heads: int = 0, num_kv_heads: int = 0):
    self.mesh = mesh
    self.units = {"heads": num_heads, "kv_heads": num_kv_heads}  # what tensor parallelism may split
    self.undivided = collections.OrderedDict()  # (pattern, axis, mesh axis, size, units) -> count

  def spec(self, path: str, shape) -> P:
    if len(shape) == 0:
      return P()
    axes = logical_axes(path, len(shape))
    if axes is None:
      if len(shape) >= 2:
        raise JaxteleError(f"sharding: no rule for parameter {path} of shape {tuple(shape)} (add one to "
                           "sharding.PARAM_AXES)")
      return P()  # vectors and scalars no rule names (e.g. optimizer counts) are small: replicated
    out = []
    for dim, axis in zip(shape, axes):
      mesh_axis = LOGICAL_TO_MESH.get(axis) if axis else None
      size = self.mesh.shape[mesh_axis] if mesh_axis else 1
      units = self.units.get(axis) or dim
      if mesh_axis and size > 1 and (units % size or dim % size):
        key = (parameter_name(path), axis, mesh_axis, size, units)
        self.undivided[key] = self.undivided.get(key, 0) + 1
        mesh_axis = None
      out.append(mesh_axis if size > 1 else None)
    return P(*out)

  def tree(self, tree):
    """NamedSharding for every array leaf of `tree` (params, optimizer state...), by its path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(self.mesh, self.spec(path_str(path), getattr(leaf, "shape", ()))), tree)

  def report(self) -> list[str]:
    """One line per parameter pattern left unsplit along an axis: said once, at start."""
    return [f"sharding: mesh axis {mesh_axis}={size} does not divide {axis} ({units}) of {pattern} "
            f"({n} leaves with its optimizer moments); that dimension is replicated"
            for (pattern, axis, mesh_axis, size, units), n in self.undivided.items()]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Each process's rows -> global jax Arrays sharded over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def put(tree, shardings):
  """Host arrays (identical on every process) -> global arrays with the given shardings."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, shardings)


def host_copy(tree):
  """Full numpy copies of (possibly multi-process) global arrays; a collective: every process calls it."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
  sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize, tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))
