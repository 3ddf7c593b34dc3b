"""Curves in tokens: evaluations at token counts (hand-computed steps), every row keyed by tokens seen and tokens
per parameter, and the report drawing eval curves over tokens."""

import json

import ml_collections
import pytest

from jaxtele import run_report as report
from jaxtele.errors import JaxteleError
from jaxtele.token_clock import TokenClock, log_spaced, requested_tokens

# The tiny recipe: batch 8 x seq 64 = 512 input tokens per update, 6 updates. Parameters: tied embedding
# 264 x 32 = 8,448; per layer q 32x32 + k 32x16 + v 32x16 + o 32x32 = 3,072, MLP 3 x 32x64 = 6,144, 2 norms of
# 32; final norm 32 -> 8,448 + 2 x 9,280 + 32 = 27,040.
TINY_PARAMS = 27_040


def test_log_spaced_by_hand():
  assert log_spaced(1000, 1_000_000, 4) == [1000, 10_000, 100_000, 1_000_000]
  assert log_spaced(512, 2048, 3) == [512, 1024, 2048]
  with pytest.raises(JaxteleError, match="eval.at_tokens_log"):
    log_spaced(100, 10, 3)


def test_token_counts_map_to_the_first_step_that_reaches_them():
  cfg = ml_collections.ConfigDict({"data": {"batch_size": 8, "seq_len": 64}, "train": {"steps": 6},
                                   "eval": {"at_tokens": (1000, 1536, 9999), "at_tokens_log": (512, 2048, 3)}})
  clock = TokenClock(cfg, params=100, trainable=10)
  # 1000 -> ceil(1000 / 512) = 2; 1536 -> 3 exactly; 512, 1024, 2048 -> 1, 2, 4; 9999 -> 20 > 6 steps.
  assert clock.eval_steps == {1, 2, 3, 4} and clock.unreachable == [9999]
  assert clock.index(3) == {"tokens_seen": 1536, "tokens_per_param": 15.36, "tokens_per_trainable_param": 153.6}
  with pytest.raises(JaxteleError, match="eval.at_tokens: token counts must be positive integers"):
    requested_tokens(ml_collections.ConfigDict({"at_tokens": (0,), "at_tokens_log": ()}))


def test_config_refuses_a_bad_log_range(tiny):
  from jaxtele.config import validate
  from jaxtele.models.config import ModelConfig

  with pytest.raises(JaxteleError, match=r"config: eval.at_tokens_log: expected \(first, last, count\)"):
    validate(tiny("--config.eval.at_tokens_log=(512, 2048)"), ModelConfig(max_position_embeddings=256), 8)


@pytest.fixture(scope="module")
def token_run(tiny_run):
  return tiny_run("at_tokens", "--config.eval.every=0", "--config.eval.at_tokens=(1000, 1536)",
                  "--config.eval.at_tokens_log=(512, 2048, 3)")


def test_trainer_evaluates_at_token_counts_and_keys_rows_by_tokens(token_run):
  rows = [json.loads(line) for line in open(token_run / "metrics.jsonl")]
  evals = [r for r in rows if "eval/telecom/ppl" in r]
  # at_start (0), the token counts' steps 1, 2, 3, 4 (see above), and the end of the run (6).
  assert [r["step"] for r in evals] == [0, 1, 2, 3, 4, 6]
  for r in rows:
    assert r["tokens_seen"] == 512 * r["step"]
    assert r["tokens_per_param"] == pytest.approx(512 * r["step"] / TINY_PARAMS, rel=1e-12)
    assert r["tokens_per_trainable_param"] == pytest.approx(512 * r["step"] / TINY_PARAMS, rel=1e-12)  # full FT


def test_report_draws_eval_curves_over_tokens(token_run, tmp_path):
  run = report.Run(str(token_run), "r")
  assert run.series("eval/telecom/ppl", "tokens_seen")[0] == [0, 512, 1024, 1536, 2048, 3072]
  out = tmp_path / "report"
  assert report.main([str(token_run), "--out", str(out), "--x", "tokens_seen"]) == 0
  page = (out / "report.md").read_text()
  assert "## Eval perplexity over tokens seen" in page and (out / "eval_ppl.png").read_bytes()[:4] == b"\x89PNG"
