"""The saturation reading of a sweep: G(D) and its intervals against scipy, and the pre-registered conditions on
constructed sweeps where the answer is known (a LoRA that plateaus; a LoRA equal to full FT up to seed noise)."""

import json
import math
import os

import numpy as np
import pytest

TOKENS = [0, 1000, 2000, 4000, 8000, 16000, 32000, 64000]
ARMS = ("full", "lora_r1", "lora_r4", "lora_r32", "lora_r1_emb")


def curve(arm, k, seed, saturating):
  base = 3.0 - 0.1 * k  # full FT: keeps learning at every doubling
  noise = 0.002 * math.sin(7 * seed + k)
  if not saturating or arm == "full":
    return base + noise
  plateau = {"lora_r1": 3, "lora_r1_emb": 4, "lora_r4": 5, "lora_r32": 7}[arm]
  return 3.0 - 0.1 * min(k, plateau) - 0.01 * max(k - plateau, 0) + noise


def make_summary(root, saturating):
  runs, arms = [], {}
  for arm in ARMS:
    combo = {"optimizer.lr": 0.01}
    arms[arm] = {"best": {"combo": combo}}
    for seed in (0, 1, 2):
      name = f"lr=0.01,seed={seed}"
      runs.append({"arm": arm, "name": name, "combo": combo, "seed": seed, "status": "done",
                   "curve": [{"step": k, "tokens_seen": t, "eval/target_spec/loss": curve(arm, k, seed, saturating)
                              * math.log(2), "eval/source_heldout/loss": 2.0 + 0.01 * k}
                             for k, t in enumerate(TOKENS)]})
      d = os.path.join(root, arm, name)
      os.makedirs(d, exist_ok=True)
      if arm.startswith("lora"):  # rho over D: falling when saturating
        for step, rho in ((57, 0.5), (228, 0.2 if saturating else 0.6)):
          json.dump({"step": step, "rho": rho + 0.01 * seed, "intruders_by_eps": {"eps": [0.5], "total": [1]}},
                    open(os.path.join(d, f"diagnostics_step{step}.json"), "w"))
  json.dump({"arms": arms, "runs": runs}, open(os.path.join(root, "summary.json"), "w"))


@pytest.mark.parametrize("saturating", [True, False])
def test_reading_on_known_sweeps(tmp_path, saturating):
  from scipy import stats

  from jaxtele.eval.saturation import report

  root = str(tmp_path / "sweep")
  make_summary(root, saturating)
  res = report(root, str(tmp_path / "out"), None, "full", "lora_r1", ["lora_r1", "lora_r4", "lora_r32"],
               ["lora_r1", "lora_r1_emb"], sets=["target_spec", "source_heldout"], log=lambda m: None)
  g = res["gap"]["lora_r1"][-1]
  d = np.array([curve("lora_r1", 7, s, saturating) - curve("full", 7, s, saturating) for s in range(3)])
  half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)  # the outside reference for the interval
  assert g["mean"] == pytest.approx(d.mean(), abs=1e-9)
  assert g["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-3, abs=1e-9)
  c = res["conditions"]
  if saturating:
    assert all(c[k]["holds"] for k in ("1_gap_grows", "2_gain_ratio", "3_rank", "4_rho_falls"))
    assert c["reading"] == "saturates: supported" and not c["refuted_check"]["holds"]
  else:
    assert not c["1_gap_grows"]["holds"] and not c["4_rho_falls"]["holds"]
    assert c["reading"] == "refuted at this scale"
  assert os.path.isfile(tmp_path / "out" / "gap.png") and "Reading" in open(tmp_path / "out" / "results.md").read()


def test_report_names_a_missing_arm(tmp_path):
  from jaxtele.errors import JaxteleError
  from jaxtele.eval.saturation import report

  root = str(tmp_path / "sweep")
  make_summary(root, True)
  with pytest.raises(JaxteleError, match="arm 'lora_r64' has no finished chosen point"):
    report(root, str(tmp_path / "out"), None, "full", "lora_r64", [], [], sets=["target_spec", "source_heldout"])


def test_unigram_baseline(tmp_path):
  from jaxtele.eval.saturation import unigram_bpb

  for name, text in (("train", "ab" * 50), ("eval", "ab")):
    (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "x", "text": text}) + "\n")
  p = 51 / (100 + 256)  # add-one counts over 256 byte values
  assert unigram_bpb(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")) == pytest.approx(-math.log2(p))
