"""Accelerator defaults, decided in one place: `auto` dtypes, XLA's GPU flags, the mesh context.

- `model.dtype: auto` computes in bf16 on GPU/TPU and fp32 on CPU (fp32 dots on a GPU run as TF32 anyway,
  and fp32 Triton attention blocks do not fit Hopper's shared memory at head dim 128).
  `lora.base_dtype: auto` stores the frozen base in the compute dtype on GPU/TPU and fp32 on CPU.
  `build` resolves both (and `model.attention: auto`) before the model is made; the model sees names only.
- On a CUDA machine, `set_gpu_flags` adds XLA flags from the JAX GPU performance guide and a collective
  timeout to `XLA_FLAGS`, before JAX's backend starts; any flag the user already set wins.
- `mesh_context(mesh)` enters JAX's mesh context, from which the fused attention kernels take their mesh.
"""

import importlib.util
import os

import jax

ACCELERATORS = ("gpu", "tpu")
PLATFORMS = ("cpu", *ACCELERATORS)  # what `jax.devices()[0].platform` can be
DTYPES = ("float32", "bfloat16")  # parameter and compute dtypes (`auto` resolves to one of them)
COLLECTIVE_TIMEOUT_S = 600  # JAXTELE_COLLECTIVE_TIMEOUT overrides: a rank stuck this long in NCCL ends the run

# name -> value; the latency-hiding scheduler overlaps collectives with compute (FSDP all-gathers, gradient
# reduce-scatters); the NCCL termination timeout ends a process stuck in a collective rendezvous.
GPU_XLA_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_nccl_termination_timeout_seconds": None,  # filled from COLLECTIVE_TIMEOUT_S / the environment
}
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def resolve_dtype(value: str, backend: str | None = None) -> str:
  """`model.dtype`: `auto` -> bfloat16 on GPU/TPU, float32 elsewhere; other values unchanged."""
  if value != "auto":
    return value
  return "bfloat16" if (backend or jax.default_backend()) in ACCELERATORS else "float32"


def resolve_base_dtype(value: str, compute_dtype: str, backend: str | None = None) -> str:
  """`lora.base_dtype`: `auto` -> the compute dtype on GPU/TPU (the frozen base is read once per matmul,
  in that dtype), float32 elsewhere."""
  if value != "auto":
    return value
  return resolve_dtype(compute_dtype, backend) if (backend or jax.default_backend()) in ACCELERATORS else "float32"


def cuda_expected(environ=None) -> bool:
  """A CUDA plugin is installed and JAX_PLATFORMS does not exclude it; decided without starting a backend."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").lower()
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  for name in CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def merge_flags(existing: str, defaults: dict) -> tuple[str, list[str]]:
  """`existing` XLA_FLAGS plus each default whose flag name it does not already set -> (flags, added)."""
  present = {tok.lstrip("-").split("=", 1)[0] for tok in existing.split()}
  added = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
  return " ".join([existing.strip(), *added]).strip(), added


def gpu_flag_defaults(environ=None) -> dict:
  environ = os.environ if environ is None else environ
  timeout = str(int(environ.get("JAXTELE_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_S)))
  return {**GPU_XLA_FLAGS, "xla_gpu_nccl_termination_timeout_seconds": timeout}


def set_gpu_flags(environ=None, force: bool = False) -> list[str]:
  """Add the GPU defaults to XLA_FLAGS (the ones added are returned). No-op without CUDA, with
  JAXTELE_XLA_DEFAULTS=0, or once a backend is up (XLA reads its flags only when the backend starts)."""
  environ = os.environ if environ is None else environ
  if environ.get("JAXTELE_XLA_DEFAULTS", "1") == "0" or not (force or cuda_expected(environ)):
    return []
  from jax._src import xla_bridge  # private, hence the getattr: a JAX without it is assumed not yet started

  if not force and getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    return []
  environ["XLA_FLAGS"], added = merge_flags(environ.get("XLA_FLAGS", ""), gpu_flag_defaults(environ))
  return added


def mesh_context(mesh):
  """`with mesh_context(mesh):` JAX's mesh context (jax.set_mesh; jax.sharding.use_mesh before it existed)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)
