"""The lambda test: intruder singular values scaled on planted matrices (the truth is known), and end to end on a
tiny LoRA run, where lambda = 1 must reproduce the trainer's own final evaluation."""

import json

import numpy as np
import pytest

from jaxtele.eval import diagnose
from jaxtele.eval.intruder_scale import main, scale_intruders
from jaxtele.metrics import read_metrics


@pytest.fixture(scope="module")
def planted():
  rng = np.random.default_rng(1)
  base_IO = rng.standard_normal((48, 64)) / 8
  a, b = rng.standard_normal(48), rng.standard_normal(64)
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  top = np.linalg.svd(base_IO, compute_uv=False)[0]
  return base_IO, base_IO + 3 * top * np.outer(a, b), b  # a new top direction b in the output space


def test_scaling_acts_on_the_intruders_only(planted):
  base_IO, tuned_IO, b = planted
  same, n = scale_intruders(base_IO, tuned_IO, 1.0)
  assert n == diagnose.intruder_dimensions(base_IO, tuned_IO) >= 1 and np.array_equal(same, tuned_IO)
  s_tuned = np.linalg.svd(tuned_IO, compute_uv=False)
  idx = np.flatnonzero(diagnose.intruder_similarity(base_IO, tuned_IO) < 0.5)
  for lam in (0.5, 0.0):
    w, _ = scale_intruders(base_IO, tuned_IO, lam)
    expect = s_tuned.copy()
    expect[idx] *= lam
    assert np.allclose(np.sort(np.linalg.svd(w, compute_uv=False)), np.sort(expect), atol=1e-9)
  removed, _ = scale_intruders(base_IO, tuned_IO, 0.0)
  # the planted output direction is gone from the top of the spectrum: what is left is the base's neighbourhood
  assert abs(np.linalg.svd(removed.T)[0][:, 0] @ b) < 0.5
  unchanged, none = scale_intruders(base_IO, base_IO, 0.0)
  assert none == 0 and np.array_equal(unchanged, base_IO)


@pytest.mark.slow  # trains a tiny run (shared with the diagnose tests)
def test_lambda_one_is_the_run_itself(tiny_run, tmp_path):
  run = tiny_run("lora_r2", "--config.train.mode=lora", "--config.lora.rank=2")
  out = tmp_path / "lam.json"
  assert main([str(run), "--lambdas", "1,0", "--eps", "0.9", "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  final = [r for r in read_metrics(str(run)) if any(k.startswith("eval/") for k in r)][-1]
  for name, v in res["rows"][0]["sets"].items():
    assert v["loss"] == pytest.approx(final[f"eval/{name}/loss"], rel=1e-5), name
  assert res["rows"][1]["lambda"] == 0.0 and res["intruders_total"] >= 0


def test_bad_lambdas(tmp_path, capsys):
  with pytest.raises(SystemExit, match="2"):
    main([str(tmp_path), "--lambdas", "1,2"])
  assert "--lambdas: each scale must be in [0, 1]" in capsys.readouterr().err
