"""One schema mechanism for every config (training, evaluation, the data pipeline's part of both).

A schema is a nested dict whose leaves are `Key`s: a default and the rule that checks it, declared on one line,
e.g. `"seq_len": Rule(int, lo=2)(512)`. `defaults(schema)` is the locked ConfigDict of the defaults (recipes and
overrides may change values, never add keys); `rules(schema)` is {dotted key: Rule}; `check(cfg, rules)` tests
every key and fails on the first bad one in one line: `config: KEY: what is wrong`.
"""

import dataclasses
import math
from typing import Any

import ml_collections
from ml_collections import FieldReference

from jaxtele.errors import JaxteleError


@dataclasses.dataclass(frozen=True)
class Rule:
  kind: type | tuple
  lo: float | None = None  # inclusive unless lo_open
  hi: float | None = None  # inclusive unless hi_open
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  optional: bool = False  # None allowed

  def __call__(self, default) -> "Key":
    """This rule with a key's default: one schema leaf."""
    return Key(default, self)

  def check(self, key: str, value):
    if value is None:
      if not self.optional:
        raise JaxteleError(f"config: {key}: must be set")
      return
    kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
      names = " or ".join(k.__name__ for k in kinds)
      raise JaxteleError(f"config: {key}: expected {names}, got {value!r}")
    if self.choices and value not in self.choices:
      raise JaxteleError(f"config: {key}: {value!r} is not one of {', '.join(map(str, self.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if isinstance(value, float) and not math.isfinite(value):
        raise JaxteleError(f"config: {key}: must be finite, got {value}")
      if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
        raise JaxteleError(f"config: {key}: must be {'>' if self.lo_open else '>='} {self.lo}, got {value}{self.span()}")
      if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
        raise JaxteleError(f"config: {key}: must be {'<' if self.hi_open else '<='} {self.hi}, got {value}{self.span()}")

  def span(self) -> str:
    if self.lo is None or self.hi is None:
      return ""
    return f" (allowed: {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'})"


@dataclasses.dataclass(frozen=True)
class Key:
  default: Any
  rule: Rule


def choice(*values, optional: bool = False) -> Rule:
  return Rule(str, choices=values, optional=optional)


POSITIVE, NONNEG, STR, BOOL, TUPLE = Rule(int, lo=1), Rule(int, lo=0), Rule(str), Rule(bool), Rule(tuple)
UNIT_OPEN = Rule(float, lo=0.0, hi=1.0, hi_open=True)  # [0, 1)
FRACTION = Rule(float, lo=0.0, hi=1.0, lo_open=True)  # (0, 1]
POSITIVE_FLOAT = Rule(float, lo=0.0, lo_open=True)
MESH_AXIS = Rule(int, lo=-1)  # -1: the rest of the devices; 0 is refused by `check_mesh`


def _default(key: Key):
  # An unset optional value is typed, so a `--config.k=v` override of it still parses.
  return FieldReference(None, field_type=key.rule.kind) if key.default is None else key.default


def defaults(schema: dict, lock: bool = True) -> ml_collections.ConfigDict:
  """The ConfigDict of a schema's defaults, locked unless it is a part that a locked whole will hold."""
  def tree(node):
    return {k: tree(v) if isinstance(v, dict) else _default(v) for k, v in node.items()}

  cfg = ml_collections.ConfigDict(tree(schema))
  if lock:
    cfg.lock()
  return cfg


def rules(schema: dict, prefix: str = "") -> dict[str, Rule]:
  """{dotted key: Rule} of a schema."""
  out = {}
  for k, v in schema.items():
    out |= rules(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v.rule}
  return out


def leaves(cfg, prefix="") -> dict:
  """{dotted key: value} for every leaf of a ConfigDict."""
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out |= leaves(v, key + ".")
    else:
      out[key] = v
  return out


def check(cfg, table: dict[str, Rule]):
  """Every key against its rule: type, range or choices. A key without a rule is a bug, not a pass."""
  for key, value in leaves(cfg).items():
    if key not in table:
      raise JaxteleError(f"config: {key}: no validation rule for this key")
    table[key].check(key, value)


def check_mesh(mesh, prefix: str = "mesh"):
  for axis in ("data", "fsdp", "tensor"):
    if mesh[axis] == 0:
      raise JaxteleError(f"config: {prefix}.{axis}: must be -1 (the rest of the devices) or >= 1, got 0")
