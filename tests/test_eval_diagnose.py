"""LoRA-vs-full diagnostics: effective rank of dW, intruder dimensions, gradient norms.

Planted matrices give the truth (a dW built with known rank, a dW inside or outside the base's singular
subspace); end to end, the LoRA property rank(dW) <= r is checked on a real tiny run, and the gradient
norms against metrics.jsonl read here line by line.
"""

import json

import numpy as np
import pytest

from jaxtele.errors import JaxteleError
from jaxtele.eval import diagnose

LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def orthonormal(rng, n, k):
  q, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return q


@pytest.mark.parametrize("r", [1, 3, 5])
def test_effective_rank_of_planted_rank_r(r):
  rng = np.random.default_rng(r)
  u, v = orthonormal(rng, 96, r), orthonormal(rng, 64, r)
  dw = u @ np.diag(np.full(r, 0.3)) @ v.T  # equal singular values: all r are needed for 90% of the energy
  assert diagnose.effective_rank(dw) == r
  assert diagnose.effective_rank(dw + 1e-9 * rng.standard_normal(dw.shape)) == r
  assert diagnose.effective_rank(np.zeros((8, 4))) == 0


def test_effective_rank_energy_cut():
  s = np.array([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25: 63%, 91%, 98%, 100%
  dw = np.diag(s)
  assert diagnose.effective_rank(dw, 0.9) == 2
  assert diagnose.effective_rank(dw, 0.95) == 3
  assert diagnose.effective_rank(dw, 0.5) == 1


@pytest.fixture(scope="module")
def base_IO():
  rng = np.random.default_rng(0)
  return rng.standard_normal((192, 256)) / 16  # kernel [in, out]


def test_no_intruders_inside_base_top_subspace(base_IO):
  u, s, vt = np.linalg.svd(base_IO.T, full_matrices=False)  # PyTorch-layout weight [out, in]
  boost = np.zeros_like(s)
  boost[:5] = [2.0, 1.5, 1.0, 0.7, 0.4]
  dw_IO = (u @ np.diag(boost) @ vt).T  # changes only the base's own top singular directions
  assert diagnose.intruder_dimensions(base_IO, base_IO + dw_IO) == 0
  assert diagnose.intruder_dimensions(base_IO, base_IO) == 0


def test_planted_random_rank_one_is_an_intruder(base_IO):
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal(192), rng.standard_normal(256)
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  top = np.linalg.svd(base_IO, compute_uv=False)[0]
  tuned = base_IO + 3 * top * np.outer(a, b)
  assert diagnose.intruder_dimensions(base_IO, tuned) >= 1
  # its output-space direction (b) is the new top singular vector, and a random direction in 256 dims
  # has |cos| well below 0.5 with every base singular vector
  sims = diagnose.intruder_similarity(base_IO, tuned)
  assert sims[0] < 0.5 and len(sims) == 10
  # a small rank-1 change leaves the top-10 vectors where they were
  assert diagnose.intruder_dimensions(base_IO, base_IO + 1e-4 * np.outer(a, b)) == 0


def read_jsonl(path):
  return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def lora_run(tiny_run):
  return tiny_run("lora_r2", "--config.train.mode=lora", "--config.lora.rank=2")


@pytest.fixture(scope="module")
def full_run(tiny_run):
  return tiny_run("full", "--config.train.mode=full")


@pytest.mark.slow  # trains a tiny run (~20 s on 2 shared cores)
def test_lora_run_end_to_end(lora_run, tmp_path, capsys):
  out = tmp_path / "diag.json"
  assert diagnose.main([str(lora_run), "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert "q_proj" in printed and "down_proj" in printed
  rows = {(r["layer"], r["module"]): r for r in result["rows"]}
  assert set(rows) == {(layer, m) for layer in (0, 1) for m in LAYER_MODULES}  # all-linear, 2 layers
  for r in rows.values():
    assert r["dw_norm"] > 0, r["path"]  # 6 steps moved every adapter
    assert 1 <= r["effective_rank"] <= 2, r  # a rank-2 adapter cannot make a higher-rank update
  assert set(result["summary"]) == set(LAYER_MODULES)
  # gradient norms: the logged values, read here independently
  logged = [row for row in read_jsonl(lora_run / "metrics.jsonl") if "train/grad_norm/lora_a" in row]
  for key in ("train/grad_norm/lora_a", "train/grad_norm/lora_b", "train/grad_norm"):
    assert result["grad_norms"][key]["steps"] == [row["step"] for row in logged]
    assert result["grad_norms"][key]["values"] == [row[key] for row in logged]
  assert "train/grad_norm/base" not in result["grad_norms"]


@pytest.mark.slow
def test_full_run_rows_and_rank(full_run, tmp_path):
  result = diagnose.diagnose(str(full_run))
  assert result["mode"] == "full" and len(result["rows"]) == 14
  # full fine-tuning with Adam moves each matrix in many directions at once: more than a rank-2 adapter can
  assert max(r["effective_rank"] for r in result["rows"]) > 2
  assert "train/grad_norm/base" in result["grad_norms"]


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    diagnose.main([str(tmp_path / "missing")])
  assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err
  with pytest.raises(JaxteleError, match="shape"):
    diagnose.compare({("layers", 0, "q_proj"): np.zeros((2, 3))}, {("layers", 0, "q_proj"): np.zeros((3, 2))})
