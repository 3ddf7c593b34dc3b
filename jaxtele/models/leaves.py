"""What a leaf a module declares says about itself, so code outside that module never names it.

An adapter class (models/adapters.py) and the NF4 storage (models/quantize.py) each list their leaves as `Leaf`
records; sharding, the optimizer, the train step's gradient-norm groups, the parameter table, PEFT conversion
and diagnose read these records by a leaf's path instead of keeping lists of names. A declared leaf lives in a
`Linear` at `<linear>/<slot>/.../<name>`: its slot (`adapters`, `quant`) tells it from a base parameter
of the same name. Axes are written in the wrapped kernel's terms: `in` (I), `out` (O), or None (its own axis,
such as the rank R); legend as in models/adapters.py.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Leaf:
  """name: the attribute and last path part. axes: one of "in" / "out" / None per dimension (sharding maps
  in / out onto the kernel's own axes). trains: a LoRAParam (trained in a LoRA run). plus: takes LoRA+'s
  higher rate (the B factor). group: its gradient-norm group (default: its name). peft: its PEFT tensor suffix
  (stored transposed, as PyTorch keeps [out, in]); None: not a PEFT tensor. counts: its entries count as model
  parameters in the parameter table (frozen bookkeeping does not)."""

  name: str
  axes: tuple
  trains: bool = True
  plus: bool = False
  group: str = ""
  peft: str | None = None
  counts: bool = True

  @property
  def grad_group(self) -> str:
    return self.group or self.name

  def shape(self, d_in: int, d_out: int, rank: int) -> tuple:
    """Our shape of this leaf on a kernel [d_in, d_out] at `rank`."""
    return tuple({"in": d_in, "out": d_out}.get(a, rank) for a in self.axes)

  def peft_shape(self, d_in: int, d_out: int, rank: int) -> tuple:
    return self.shape(d_in, d_out, rank)[::-1]


_DECLARED: dict[str, dict[str, Leaf]] = {}  # slot -> leaf name -> Leaf


def declare(slot: str, leaves) -> None:
  """Register `leaves` under `slot`; a name declared twice must mean the same leaf (a subclass repeats its
  parent's leaves), or a path could no longer say which one it is."""
  table = _DECLARED.setdefault(slot, {})
  for leaf in leaves:
    if table.get(leaf.name, leaf) != leaf:
      raise ValueError(f"leaf {slot}/{leaf.name} is declared twice, differently: {table[leaf.name]} vs {leaf}")
    table[leaf.name] = leaf


def _names(path) -> list[str]:
  if isinstance(path, str):
    return path.split("/")
  return [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]


def spec(path) -> Leaf | None:
  """The declaration of the leaf at `path` ('/'-joined, or a jax key path; optimizer moments included), or
  None for a base parameter (kernel, bias, embedding, norm scale) and anything else no module declared."""
  names = _names(path)
  for slot, table in _DECLARED.items():
    if names[-1] in table and slot in names[:-1]:
      return table[names[-1]]
  return None


def grad_group(path) -> str:
  """The gradient-norm group of a trainable leaf: its declared group, or "base" for base weights."""
  leaf = spec(path)
  return leaf.grad_group if leaf is not None and leaf.trains else "base"


def peft_leaves(slot: str) -> dict[str, Leaf]:
  """{PEFT tensor suffix: Leaf} over every leaf declared under `slot`."""
  return {leaf.peft: leaf for leaf in _DECLARED.get(slot, {}).values() if leaf.peft}
