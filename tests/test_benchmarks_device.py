"""The prepared GPU suite, run here in --smoke mode through its launch script: rows and table written, a failing
check recorded (not raised), the budget honoured, bad input refused; with the packages the GPU image lacks
made unimportable."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_ON_GPU_IMAGE = ("grain", "ml_collections", "tensorflow_datasets", "array_record", "gguf", "tensorboardX")


def suite(tmp_path, *args, timeout=1800):
  """launch/gpu_suite.sh with no carried wheels and every package the GPU image lacks blocked."""
  blocked = tmp_path / "blocked"
  for name in MISSING_ON_GPU_IMAGE:
    (blocked / name).mkdir(parents=True, exist_ok=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
  (tmp_path / "wheels").mkdir(exist_ok=True)
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(blocked), JAXTELE_WHEELS=str(tmp_path / "wheels"),
             XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([os.path.join(ROOT, "launch", "gpu_suite.sh"), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False)


def rows(out):
  return {p.stem: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}


def test_smoke_suite_rows_table_and_recorded_failure(tmp_path):
  out = tmp_path / "suite"
  r = suite(tmp_path, str(out), "--smoke", "--budget-s", "1500", "--checks-cap-s", "600", "--fail", "cudnn_tiny",
            "--only", "xla_tiny|cudnn_tiny|chunked_loss|bench_tiny_full_jaxtele|bench_tiny_lora_torch-eager")
  assert r.returncode == 1, r.stdout + r.stderr  # a failed row -> 1, never a traceback
  assert "Traceback" not in r.stdout + r.stderr
  got = rows(out)
  # The injected failure is a row, and the checks after it still ran.
  assert got["cudnn_tiny"]["status"] == "fail" and "injected" in got["cudnn_tiny"]["detail"]
  # jaxtele's xla attention vs the suite's own fp32 reference, within the stated bf16 tolerances.
  for name in ("xla_tiny_fwd", "xla_tiny_grad"):
    assert got[name]["status"] == "pass" and got[name]["max_err"] <= got[name]["tol"], got[name]
  assert got["xla_tiny_segments_erased_differs"]["max_err"] > 0.1  # erasing documents changes the answer
  assert got["chunked_loss"]["status"] == "pass" and got["chunked_loss"]["max_err"] <= 1e-5
  # The probe reads the versions the interpreter really has.
  env = got["env"]
  for pkg in ("jax", "flax", "torch", "transformers", "peft"):
    assert env["versions"][pkg] == importlib.metadata.version(pkg)
  assert env["backend"] == "cpu" and env["xla_flags"] == ""
  # The torch LoRA row is the fair one: r=64 on all seven linears of the tiny preset's 4 layers (D 128, kv 64,
  # F 384: r * (in + out) = 64 * (256 + 192 + 192 + 256 + 512 + 512 + 512) per layer, by hand), frozen base bf16.
  assert got["bench_tiny_full_jaxtele"]["status"] == "pass", got["bench_tiny_full_jaxtele"]
  assert got["bench_tiny_lora_torch-eager-packed"]["status"] == "pass", got["bench_tiny_lora_torch-eager-packed"]
  theirs = got["bench_tiny_lora_torch-eager-packed"]["result"]
  assert theirs["trainable_params"] == 4 * 64 * (256 + 192 + 192 + 256 + 512 + 512 + 512)
  assert theirs["frozen_dtypes"] == ["bfloat16"] and theirs["attention"].startswith("sdpa:")
  assert theirs["rows"].startswith("packed") and theirs["torch_mode"] == "eager"
  # Everything is on disk, and the table comes last on stdout.
  summary = json.loads((out / "summary.json").read_text())
  assert {s["name"] for s in summary} == set(got)
  log = (out / "log.txt").read_text()
  assert all(name in log for name in got)
  tail = r.stdout.strip().splitlines()
  assert "failed: cudnn_tiny" in tail[-1] and any(line.startswith("| tiny | full | jaxtele") for line in tail[-8:])


def test_budget_stops_and_skips_rows(tmp_path):
  out = tmp_path / "suite"
  # The check hangs, so the budget ends inside it however fast this machine is.
  r = suite(tmp_path, str(out), "--smoke", "--budget-s", "3", "--only", "xla_tiny|bench_tiny_full", "--hang",
            "xla_tiny", timeout=120)
  assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
  got = rows(out)
  assert got["checks_process"]["status"] == "fail" and "stopped" in got["checks_process"]["detail"]
  assert got["xla_tiny"]["status"] == "skip" and "not run" in got["xla_tiny"]["detail"]
  for side in ("jaxtele", "torch-eager-packed"):
    row = got[f"bench_tiny_full_{side}"]
    assert row["status"] == "skip" and row["detail"].startswith("budget"), row


@pytest.mark.parametrize("args, says", [((), "folder is not empty"), (("--only", "(["), "--only: not a regular")])
def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, args, says):
  out = tmp_path / "suite"
  out.mkdir()
  (out / "table.md").write_text("earlier results\n")
  r = subprocess.run([sys.executable, "-m", "jaxtele.benchmarks.device", "--out", str(out), "--smoke", *args],
                     capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and says in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert (out / "table.md").read_text() == "earlier results\n" and not (out / "rows").exists()
