"""LoRA-vs-full diagnostics: effective rank of dW, intruder dimensions, gradient norms.

Planted matrices give the truth (a dW built with known rank, a dW inside or outside the base's singular
subspace); end to end, the LoRA property rank(dW) <= r is checked on a real tiny run, and the gradient
norms against metrics.jsonl read here line by line.
"""

import json

import numpy as np
import pytest

from jaxtele.errors import JaxteleError
from jaxtele.eval import diagnose, reach
from jaxtele.run import RunDir

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
    assert r["max_rank"] == 2 and 0 <= r["rho"] <= 1 + 1e-9
  assert set(result["summary"]) == set(LAYER_MODULES)
  # gradient norms: the logged values, read here independently
  logged = [row for row in read_jsonl(RunDir(lora_run).metrics) if "train/grad_norm/lora_a" in row]
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
  assert all(r["max_rank"] == min(r["shape"]) for r in result["rows"]) and result["rho"] is None


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    diagnose.main([str(tmp_path / "missing")])
  assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err
  with pytest.raises(JaxteleError, match="shape"):
    diagnose.compare({("layers", 0, "q_proj"): np.zeros((2, 3))}, {("layers", 0, "q_proj"): np.zeros((3, 2))})


# --- rho: the share of the full-weight gradient a LoRA adapter reaches (kernels [in, out], dW = s A B). ---

def test_rho_planted_span_and_orthogonal():
  rng = np.random.default_rng(2)
  a_IR, b_RO = rng.standard_normal((12, 3)), rng.standard_normal((3, 9))
  inside = a_IR @ rng.standard_normal((3, 9)) + rng.standard_normal((12, 3)) @ b_RO  # = dA B + A dB directions
  assert reach.reachable_fraction(inside, a_IR, b_RO) == pytest.approx(1.0, abs=1e-12)
  qa, qb = orthonormal(rng, 12, 3), orthonormal(rng, 9, 3)
  a_IR, b_RO = qa @ rng.standard_normal((3, 3)), rng.standard_normal((3, 3)) @ qb.T
  z = rng.standard_normal((12, 9))
  outside = (np.eye(12) - qa @ qa.T) @ z @ (np.eye(9) - qb @ qb.T)
  assert reach.reachable_fraction(outside, a_IR, b_RO) == pytest.approx(0.0, abs=1e-12)


def test_rho_hand_computed():
  # A = e1 (input space), B = e1^T (output space): every entry but G[1, 1] is reachable: (1 + 4 + 9) / 30
  g = np.array([[1.0, 2.0], [3.0, 4.0]])
  assert reach.reachable_fraction(g, np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]])) == pytest.approx(14 / 30)
  # B = 0 (the first step): only A's side, P_A G: (1 + 4) / 30
  assert reach.reachable_fraction(g, np.array([[1.0], [0.0]]), np.zeros((1, 2))) == pytest.approx(5 / 30)


def test_rho_equals_least_squares_reach_and_the_pytorch_layout_formula():
  """rho against two outside forms: the best first-order LoRA step found by least squares over (dA, dB), and
  the formula as written for PyTorch weights [out, in] = B_t A_t with dense projectors."""
  rng = np.random.default_rng(3)
  i, o, r = 6, 5, 2
  a_IR, b_RO, g_IO = rng.standard_normal((i, r)), rng.standard_normal((r, o)), rng.standard_normal((i, o))
  # columns: d(W)/d(dA[p, q]) = E_pq B, d(W)/d(dB[p, q]) = A E_pq, vectorised
  basis = [np.outer(np.eye(i)[p], b_RO[q]) for p in range(i) for q in range(r)]
  basis += [np.outer(a_IR[:, p], np.eye(o)[q]) for p in range(r) for q in range(o)]
  m = np.stack([x.ravel() for x in basis], 1)
  proj = m @ np.linalg.lstsq(m, g_IO.ravel(), rcond=None)[0]
  want = np.sum(proj ** 2) / np.sum(g_IO ** 2)
  assert reach.reachable_fraction(g_IO, a_IR, b_RO) == pytest.approx(want, rel=1e-9)
  g_t, a_t, b_t = g_IO.T, a_IR.T, b_RO.T  # PyTorch: W [out, in], lora_A [r, in], lora_B [out, r]
  p_b = b_t @ np.linalg.pinv(b_t)  # [out, out] onto span(B_t)
  p_a = np.linalg.pinv(a_t) @ a_t  # [in, in] onto the row space of A_t
  torch_rho = (np.sum((p_b @ g_t) ** 2) + np.sum((g_t @ p_a) ** 2) - np.sum((p_b @ g_t @ p_a) ** 2)) / np.sum(g_t ** 2)
  assert torch_rho == pytest.approx(want, rel=1e-9)


def test_intruders_by_eps_hand_counted():
  rows = [{"module": "q_proj", "top_similarity": [0.05, 0.35, 0.95]}, {"module": "v_proj", "top_similarity": [0.55]}]
  got = diagnose.intruders_by_eps(rows, (0.1, 0.5, 0.9))
  assert got == {"eps": [0.1, 0.5, 0.9], "total": [1, 2, 3], "by_module": {"q_proj": [1, 2, 2], "v_proj": [0, 0, 1]}}


@pytest.mark.slow  # trains a tiny DoRA run on an NF4 base (~20 s on 2 shared cores)
def test_qdora_run_magnitude_group_and_nf4_base(tiny_run):
  """DoRA over an NF4 base: diagnose reads the quantized kernels through base_kernel and lists every gradient
  group the run logged, the magnitude included, with parameter counts hand-derived from the tiny model."""
  run = tiny_run("qdora_r2", "--config.train.mode=lora", "--config.lora.rank=2", "--config.lora.variant=dora",
                 "--config.lora.quantize_base=nf4")
  result = diagnose.diagnose(str(run))
  logged = {k for row in read_jsonl(RunDir(run).metrics) for k in row if k.startswith("train/grad_norm")}
  assert "train/grad_norm/lora_magnitude" in logged and set(result["grad_norms"]) == logged
  # hidden 32, 4 heads x 8 (q, o: 32x32), 2 kv heads (k, v: 32x16), mlp 64; rank 2; 2 layers
  shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
  a_b = 2 * sum(2 * i for i, _ in shapes)  # = 2 * sum(2 * o) too: both 1,024 here
  assert result["grad_groups"] == {"lora_a": a_b, "lora_b": 2 * sum(2 * o for _, o in shapes),
                                   "lora_magnitude": 2 * sum(o for _, o in shapes)}
  assert result["grad_norms"]["train/grad_norm/lora_magnitude"]["parameters"] == 512
  assert len(result["rows"]) == 14 and all(0 <= r["rho"] <= 1 + 1e-9 for r in result["rows"])
  assert 0 < result["rho"] < 1
  assert all(r["max_rank"] == min(r["shape"]) for r in result["rows"])  # DoRA rescales columns: any rank
  ratio = result["update_ratio"]["q_proj"]
  assert ratio["steps"] == [3, 6] and 0 < ratio["values"][0] < ratio["values"][1]
  # the last checkpoint's ratio is the rows' own ||dW|| / ||W0|| pooled over the layers
  qs = [r for r in result["rows"] if r["module"] == "q_proj"]
  pooled = np.sqrt(sum(r["dw_norm"] ** 2 for r in qs) / sum((r["dw_norm"] / r["rel_change"]) ** 2 for r in qs))
  assert ratio["values"][-1] == pytest.approx(pooled, rel=1e-5)
