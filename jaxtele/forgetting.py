"""The trainer's side of gain against forgetting (`eval.forgetting_base`): the frozen base evaluated once, every
later evaluation scored against it in bits per byte, the forgetting budget, and the frontier checkpoints that
keep-last-N must not delete (`frontier.py` holds the definitions).

The base is the run's initial parameters: for full FT the source weights, for LoRA the base with freshly
initialised adapters (B = 0, or PiSSA's exact split), i.e. the model before its first step. It is evaluated at
step 0 on the same eval batches every later evaluation sees, with their UTF-8 byte counts, and kept in
`run_dir/forgetting_base.json` so a resumed run scores against the same numbers.
"""

import json
import math
import os

import jax

from jaxtele import frontier
from jaxtele.run import FORGETTING_BASE, RunDir
from jaxtele.metrics import eval_key, forget_key, read_metrics

BASE_FILE = FORGETTING_BASE


class Forgetting:
  def __init__(self, cfg, log):
    self.cfg, self.log = cfg, log
    self.roles = {spec.get("name", f"set{i}"): frontier.role(spec) for i, spec in enumerate(cfg.eval.sets)}
    self.budget = float(cfg.train.forgetting_budget)
    self.stop = cfg.train.on_budget == "stop"
    self.path = RunDir(cfg.run_dir).file(BASE_FILE)
    self.base = json.load(open(self.path)) if os.path.isfile(self.path) else None
    self.history = frontier.points(read_metrics(cfg.run_dir), self.budget)

  def pooled(self, out: dict, nbytes: dict) -> dict:
    """{role: bpb} pooled over the sets of each role: summed nats / ln 2 / summed bytes."""
    res = {}
    for r in frontier.ROLES:
      names = [n for n, x in self.roles.items() if x == r]
      nats = sum(out[eval_key(n, "loss")] * out[eval_key(n, "tokens")] for n in names)
      res[r] = nats / math.log(2) / max(sum(nbytes[n] for n in names), 1.0)
    return res

  def evaluate_base(self, s, evaluate, step: int) -> dict:
    """Evaluate the base with byte counts (at step 0 the state holds it; a resumed run rebuilds it)."""
    from jaxtele import build
    from jaxtele.evaluate import scored_bytes
    from jaxtele.sharding import put

    params = s.state["params"]
    if step > 0:
      self.log(f"forgetting: no {self.path} from step 0; rebuilding the initial parameters to evaluate the base")
      params = put(build.split_model(build.build_model(s.cfg), s.cfg)[1], s.state_sh["params"])
    out = evaluate(params, scored_bytes(s.tokenizer))
    nbytes = {n: out[eval_key(n, "bytes")] for n in self.roles}
    bpb = self.pooled(out, nbytes)
    self.base = {"bytes": nbytes, **{f"{r}_bpb": v for r, v in bpb.items()}}
    if jax.process_index() == 0:
      with open(self.path, "w") as f:
        json.dump(self.base, f, indent=2)
    self.log(f"forgetting base: domain bpb {self.base['domain_bpb']:.4f}, general bpb {self.base['general_bpb']:.4f}")
    return out | self.metrics(0, out, bpb)

  def metrics(self, step: int, out: dict, bpb: dict | None = None) -> dict:
    """forget/* of one evaluation; logs when general bpb is over budget."""
    bpb = bpb or self.pooled(out, self.base["bytes"])
    d, g = bpb["domain"], bpb["general"]
    base = {"domain_bpb": self.base["domain_bpb"], "general_bpb": self.base["general_bpb"]}
    over = frontier.over_budget(g, base, self.budget)
    m = {forget_key("domain_bpb"): d, forget_key("general_bpb"): g, forget_key("base_domain_bpb"): base["domain_bpb"],
         forget_key("base_general_bpb"): base["general_bpb"], forget_key("domain_gain"): base["domain_bpb"] - d,
         forget_key("general_increase"): g / base["general_bpb"] - 1.0}
    if self.budget > 0:
      m[forget_key("over_budget")] = float(over)
    if step > 0:
      self.history = [p for p in self.history if p["step"] != step] + [
          {"step": step, "domain_bpb": d, "general_bpb": g, "over_budget": over}]
    if over:
      self.log(f"step {step}: general bpb {g:.4f} is {g / base['general_bpb'] - 1:+.2%} vs the base "
               f"(budget +{self.budget:.2%}): over budget"
               + ("; stopping (train.on_budget=stop)" if self.stop else "; its checkpoints are marked over budget"))
    return m

  def over(self, step: int) -> bool:
    return any(p["step"] == step and p["over_budget"] for p in self.history)

  def protect(self, ckpt, saving: int | None):
    """Keep-last-N must not delete frontier checkpoints: the frontier of the in-budget points among the saved
    steps (and the one about to be saved)."""
    steps = set(ckpt.all_steps()) | ({saving} if saving is not None else set())
    pts = [p for p in self.history if p["step"] in steps and not p["over_budget"]]
    ckpt.protected.clear()
    ckpt.protected.update(frontier.pareto(pts))
