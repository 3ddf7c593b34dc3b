"""The run-comparison report: a Markdown page with PNG plots, on two tiny runs (full and LoRA)."""

import json
import os
import re

import pytest

from jaxtele import run_report as report
from jaxtele.eval import diagnose
from jaxtele.run import DIAGNOSTICS, RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_run):
  full = tiny_run("full", "--config.train.mode=full")
  lora = tiny_run("lora_r2", "--config.train.mode=lora", "--config.lora.rank=2")
  with open(RunDir(lora).file(DIAGNOSTICS), "w") as f:
    json.dump(diagnose.diagnose(str(lora)), f)
  return {"full": full, "lora_r2": lora}


def last_logged_loss(run_dir):
  value = None
  for line in open(RunDir(run_dir).metrics):
    row = json.loads(line)
    value = row.get("train/loss", value)
  return value


@pytest.mark.slow  # trains two tiny runs unless the diagnose tests already did (~30 s)
def test_report_page_plots_and_final_losses(runs, tmp_path, capsys):
  out = tmp_path / "report"
  assert report.main([str(runs["full"]), str(runs["lora_r2"]), "--out", str(out)]) == 0
  page = (out / "report.md").read_text()
  assert capsys.readouterr().out.strip() == str(out / "report.md")
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
  assert set(images) == {"loss.png", "eval_ppl.png", "domain_vs_general.png", "grad_norms.png", "intruders.png",
                         "diagnostics.png"}
  assert "| lora_r2 | q_proj | " in page and "| 2 |" in page  # effective rank next to the maximum rank
  for name in images:
    assert not os.path.isabs(name)
    data = (out / name).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, name
  assert "Skipped" not in page
  for name, run_dir in runs.items():
    loss = last_logged_loss(run_dir)
    row = next(line for line in page.splitlines() if line.startswith(f"| {name} | ") and "->" in line)
    assert f"| {loss:.4f} |" in row, (row, loss)
  assert "| lora_r2 | " in page and "| 2 |" in page  # the LoRA rank in the settings table


def test_missing_data_skips_plots(tmp_path):
  run_dir = tmp_path / "bare"
  run_dir.mkdir()
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 5.0 - s / 10}) + "\n"
                                                 for s in (1, 2, 3)))
  path = report.build_report([str(run_dir)], str(tmp_path / "out"))
  page = open(path).read()
  assert "![Loss curves](loss.png)" in page and os.path.isfile(tmp_path / "out" / "loss.png")
  assert page.count("_Skipped:") == 5
  assert "| bare | 3 | 4.7000 |" in page


def test_bad_run_dir(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
  assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text("")
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.strip() == f"error: {tmp_path / 'empty' / 'metrics.jsonl'}: empty (the run has " \
      "logged no metrics yet: nothing to report)"
  assert not (tmp_path / "out" / "report.md").exists()
