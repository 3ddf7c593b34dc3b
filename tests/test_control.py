"""The positive control: with a planted rank-k difference between base and teacher, continual pretraining by LoRA
with r < k plateaus above the teacher's loss while r = k and full fine-tuning reach it. The reference is the
teacher itself: its own loss on its samples is the floor every arm is measured against."""

import numpy as np

from jaxtele.eval.control import Control, continual_pretrain, planted_update, teacher_corpus


def test_planted_update_has_rank_k():
  c = Control(rank=3)
  s = np.linalg.svd(planted_update(c, 0), compute_uv=False)
  np.testing.assert_allclose(s[:3], c.scale, rtol=1e-5)
  assert s[3] < 1e-5


def test_lora_below_the_planted_rank_plateaus_above_the_teacher():
  c = Control(rank=2)
  steps, batch = 160, 48
  corpus = teacher_corpus(c, steps * batch, seed=2)
  runs = {arm: continual_pretrain(c, arm, lr, steps, batch, every=40, held_docs=256, corpus=corpus)
          for arm, lr in (("full", 3e-3), ("lora:1", 1e-2), ("lora:2", 1e-2))}
  start = runs["full"]["curve"][0][1]
  final = {arm: r["curve"][-1][1] for arm, r in runs.items()}
  assert start > 0.1  # the base is far from the teacher: there is something to learn
  assert final["lora:2"] < 0.1 * start and final["full"] < 0.1 * start  # r = k and full FT reach the teacher
  assert final["lora:1"] > 0.2 * start  # r < k cannot express dW ...
  assert final["lora:1"] > 3 * max(final["lora:2"], final["full"])
  mid = runs["lora:1"]["curve"][len(runs["lora:1"]["curve"]) // 2][1]
  assert abs(mid - final["lora:1"]) < 0.3 * final["lora:1"]  # ... and has plateaued
