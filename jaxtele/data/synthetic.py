"""A small generated telecom-style corpus for the quickstart and the tests: offline, deterministic,
with facts that repeat across documents (so a tiny model can learn them and held-out perplexity drops).
"""

import json
import os
import random

ENTITIES = {
    "AMF": ("TS 23.501", "handles registration, connection and mobility management for the UE"),
    "SMF": ("TS 23.501", "establishes, modifies and releases PDU sessions"),
    "UPF": ("TS 23.501", "routes and forwards user plane packets and enforces QoS"),
    "gNB": ("TS 38.300", "terminates the NR user plane and control plane towards the UE"),
    "MAC entity": ("TS 38.321", "multiplexes logical channels onto transport channels and runs HARQ"),
    "RLC entity": ("TS 38.322", "segments and reassembles SDUs in acknowledged or unacknowledged mode"),
    "PDCP entity": ("TS 38.323", "ciphers, protects the integrity of and reorders PDCP SDUs"),
    "SDAP entity": ("TS 37.324", "maps QoS flows to data radio bearers"),
    "BAP entity": ("TS 38.340", "routes packets across IAB nodes on the backhaul"),
    "PCF": ("TS 23.501", "provides policy rules for control plane functions"),
}
PROCEDURES = ("registration", "service request", "handover", "PDU session establishment", "paging",
              "random access", "RRC connection setup", "beam failure recovery")
TIMERS = ("T3510", "T3511", "T3502", "T300", "T301", "T310", "T311", "T319")


def document(rng: random.Random, i: int) -> str:
  name = rng.choice(sorted(ENTITIES))
  spec, role = ENTITIES[name]
  proc, timer = rng.choice(PROCEDURES), rng.choice(TIMERS)
  # Facts (entity -> spec, role) repeat and can be learnt; cell ids and timer values are noise, so
  # held-out perplexity has a floor well above 1.
  sentences = [
      f"Clause {rng.randint(4, 9)}.{rng.randint(1, 12)} of {spec} describes the {name}.",
      f"The {name} {role}.",
      f"During {proc} on cell {rng.randint(0, 1007)}, the UE starts timer {timer} and waits for the {name}.",
      f"The network sets {timer} to {rng.choice((1, 2, 5, 10, 15, 30, 60))} s for this UE.",
      f"When {timer} expires, the UE aborts the {proc} procedure and informs upper layers.",
      f"The {name} is specified in {spec}.",
  ]
  middle = sentences[2:5]
  rng.shuffle(middle)
  return " ".join(sentences[:2] + middle + sentences[5:])


def ensure_corpus(folder: str, n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> dict:
  """Write `train.jsonl` and `eval.jsonl` under `folder` unless they exist; returns their paths."""
  paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "eval")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(folder, exist_ok=True)
  rng = random.Random(seed)
  for split, n in (("train", n_train), ("eval", n_eval)):
    # Per-process temporary name: processes of a multi-host launch may generate the same corpus at once.
    tmp = f"{paths[split]}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      for i in range(n):
        f.write(json.dumps({"text": document(rng, i)}) + "\n")
    os.replace(tmp, paths[split])
  return paths
