"""The trainer: loss goes down on 1 and 8 devices (and agrees), LoRA freezes the base and holds moments
only for adapters, gradient accumulation equals one big batch, exact resume after SIGKILL, preemption."""

import json
import os
import signal
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.models.lora import trainable_filter
from jaxtele.run import EXPORT, TENSORBOARD, RunDir
from jaxtele.step import init_state, make_train_step

def test_full_and_lora_lower_the_loss_and_one_device_matches_eight(tmp_path, tiny, train_cli, logged):
  from jaxtele.train import run

  for mode in ("full", "lora"):
    d = tmp_path / mode
    d.mkdir()
    common = [f"--config.train.mode={mode}", "--config.train.steps=8", "--config.train.log_every=1",
              "--config.lora.rank=4"]
    res8 = run(tiny(*common, "--config.mesh.data=2", "--config.mesh.fsdp=4", run_dir=d / "run"))
    assert res8["losses"][-1] < res8["losses"][0] - 0.05, res8["losses"]
    one = d / "one"
    one.mkdir()
    rc, err = train_cli(one, *common, "--config.mesh.data=1", devices=1)
    assert rc == 0, err[-2000:]
    losses1 = [v for _, v in sorted(logged(one / "run").items())]
    np.testing.assert_allclose(losses1, res8["losses"], atol=1e-5, rtol=0)


def test_lora_freezes_the_base_and_optimizes_only_adapters(tmp_path, tiny):
  from jaxtele import build
  from jaxtele.train import run

  cfg = tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.lora.targets=q_proj,v_proj")
  _, _, frozen_before = build.split_model(build.build_model(cfg), cfg)
  res = run(cfg)
  frozen_after = jax.device_get(res["frozen"])
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical
  params = res["state"]["params"]
  n_layers = cfg.model.init.num_layers
  names = sorted({f"{p[-4].key}/{p[-1].key}" for p, _ in jax.tree_util.tree_leaves_with_path(params)})
  assert names == ["q_proj/lora_a", "q_proj/lora_b", "v_proj/lora_a", "v_proj/lora_b"]
  assert len(jax.tree.leaves(params)) == 4 * n_layers
  adam = res["state"]["opt_state"][1][0]
  assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(adam.nu)) == 4 * n_layers
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adam.mu))
  # Metrics reach metrics.jsonl and TensorBoard, with gradient norms per group.
  rows = [json.loads(line) for line in open(RunDir(tmp_path / "run").metrics)]
  train_rows = [r for r in rows if "train/loss" in r]
  assert {"train/grad_norm", "train/grad_norm/lora_a", "train/grad_norm/lora_b", "train/lr",
          "train/tokens_per_s"} <= set(train_rows[-1])
  assert any("eval/telecom/ppl" in r for r in rows)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(RunDir(tmp_path / "run").file(TENSORBOARD)))


def test_gradient_accumulation_equals_one_big_batch():
  """k micro-batches of b rows = one batch of k*b rows (<= 1e-5), with uneven trained-token counts."""
  from flax import nnx

  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
  model = init_model(cfg)
  graphdef, params, frozen = nnx.split(model, trainable_filter("full"), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  rng = np.random.default_rng(0)
  B, T = 8, 16
  mask = (rng.random((B, T)) < np.linspace(0.1, 1.0, B)[:, None]).astype(np.int32)  # rows train 10%..100%
  batch = {"tokens": rng.integers(0, 64, (B, T)), "targets": rng.integers(0, 64, (B, T)),
           "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T), (B, 1)), "loss_mask": mask}
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
  tx = optax.sgd(1.0)
  out = {}
  for k in (1, 4):
    state = init_state(params, tx)
    out[k] = jax.jit(make_train_step(graphdef, tx, k))(state, frozen, batch)
  np.testing.assert_allclose(out[1][1]["loss"], out[4][1]["loss"], atol=1e-5)
  for a, b in zip(jax.tree.leaves(out[1][0]["params"]), jax.tree.leaves(out[4][0]["params"]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # The loss is the mean over trained targets of the whole batch, not a mean of per-micro-batch means.
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(out[4][1]["loss"], (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_exact_resume_after_sigkill(tmp_path, train_cli, wait_for_lines, logged):
  steps = 12
  common = ["--config.train.steps=12", "--config.train.log_every=1", "--config.checkpoint.every=1",
            "--config.checkpoint.async_save=True"]
  straight = tmp_path / "straight"
  straight.mkdir()
  rc, err = train_cli(straight, *common)
  assert rc == 0, err[-2000:]
  killed = tmp_path / "killed"
  killed.mkdir()
  p = train_cli(killed, *common, wait=False)
  wait_for_lines(RunDir(killed / "run").metrics, steps // 2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert len(logged(killed / "run")) < steps, "the run was killed before it finished"
  rc, err = train_cli(killed, *common)
  assert rc == 0, err[-2000:]
  assert "resumed from" in err
  want, got = logged(straight / "run"), logged(killed / "run")
  assert sorted(got) == list(range(1, steps + 1))
  assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # identical, not merely close
  from jaxtele.checkpoint import saved_params

  trees = [saved_params(str(d / "run"), steps) for d in (straight, killed)]
  for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1]), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_and_exits_cleanly(tmp_path, train_cli, wait_for_lines):
  p = train_cli(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1",
                     "--config.checkpoint.every=100000", wait=False)
  wait_for_lines(RunDir(tmp_path / "run").metrics, 3)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err
  step = int(err.split("SIGTERM: saved step ")[1].split()[0])
  assert step in RunDir(tmp_path / "run").steps()


def test_two_processes_match_one(tmp_path, train_cli, launch_two, logged):
  """2 processes x 4 CPU devices through jax.distributed and launch/local_multiprocess.sh give the losses
  of 1 process x 8 devices, and their checkpoint resumes in 1 process. Every document is the same, so
  batches are the same however data is sharded."""
  corpus = tmp_path / "same.jsonl"
  # One document shorter than a row: no piece is cut before the shuffle, so every row is the same on any shard.
  corpus.write_text((json.dumps({"text": "The AMF handles registration and mobility."}) + "\n") * 64)
  common = [f"--config.data.sources=[{{'type': 'jsonl', 'path': '{corpus}'}}]", "--config.train.steps=5",
            "--config.train.log_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=4",
            f"--config.eval.sets=[{{'name': 'same', 'sources': [{{'type': 'jsonl', 'path': '{corpus}'}}]}}]",
            "--config.eval.max_batches=2", "--config.export.hf=True"]
  one = tmp_path / "one"
  one.mkdir()
  rc, err = train_cli(one, *common)
  assert rc == 0, err[-2000:]
  two = tmp_path / "two"
  two.mkdir()
  p = launch_two(two, *common)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "over 8 cpu devices, 2 process(es)" in p.stderr
  for key in ("train/loss", "eval/same/loss"):
    want, got = logged(one / "run", key), logged(two / "run", key)
    assert sorted(want) == sorted(got) and want
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], atol=1e-5)
  assert os.path.isfile(os.path.join(RunDir(two / "run").file(EXPORT), "hf", "model.safetensors"))
  assert RunDir(two / "run").steps() == RunDir(one / "run").steps()

  # Resume to step 8 on another process count, both ways (2 -> 1 also onto a data x fsdp x tensor mesh). Grain's iterator states are per process, so
  # the stream restarts in a new order (identical documents: the same batches); parameters and optimizer
  # state must continue as in a same-count resume of `one`, which restores the data position too.
  one_in_two = tmp_path / "one_in_two"
  shutil.copytree(one / "run", one_in_two / "run")
  # No export at step 8: the exports of step 5 were checked above, and each one reloads in transformers (torch).
  more = ["--config.train.steps=8", "--config.checkpoint.resume=True", "--config.export.hf=False"]
  rc, err = train_cli(one, *common, *more)
  assert rc == 0, err[-2000:]
  rc, err = train_cli(two, *common, *more, "--config.mesh.fsdp=2", "--config.mesh.tensor=2")  # and another mesh
  assert rc == 0 and "saved by 2 process(es) and this run has 1" in err, err[-2000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in err
  p = launch_two(one_in_two, *common, *more)
  assert p.returncode == 0 and "saved by 1 process(es) and this run has 2" in p.stderr, p.stderr[-3000:]
  want = logged(one / "run")
  for run_dir in (two, one_in_two):
    got = logged(run_dir / "run")
    np.testing.assert_allclose([got[s] for s in (6, 7, 8)], [want[s] for s in (6, 7, 8)], atol=1e-5)


def _process_with_rank(parent_pid: int, rank: int) -> int:
  """The pid of the launched `python -m jaxtele.train` whose JAX_PROCESS_ID is `rank`."""
  children = subprocess.run(["pgrep", "-P", str(parent_pid)], capture_output=True, text=True).stdout.split()
  for pid in children:
    try:
      env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except FileNotFoundError:
      continue
    if f"JAX_PROCESS_ID={rank}".encode() in env:
      return int(pid)
  raise AssertionError(f"no child of {parent_pid} with JAX_PROCESS_ID={rank}")


@pytest.mark.slow
def test_a_killed_process_stops_its_peer_and_a_fresh_run_resumes(tmp_path, launch_two, wait_for_lines, logged,
                                                                 monkeypatch):
  """SIGKILL one of two processes mid-run: the other exits non-zero within 2 minutes naming the lost process,
  and a fresh two-process run resumes from the last complete checkpoint to the losses of an uninterrupted run."""
  monkeypatch.setenv("JAXTELE_PEER_TIMEOUT", "20")
  common = ["--config.train.steps=10", "--config.train.log_every=1", "--config.checkpoint.every=2",
            "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.eval.sets=[]"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  straight.mkdir(), killed.mkdir()
  p = launch_two(straight, *common)
  assert p.returncode == 0, p.stderr[-3000:]
  p = launch_two(killed, *common, wait=False)
  wait_for_lines(RunDir(killed / "run").metrics, 5)
  victim = _process_with_rank(p.pid, 1)
  os.kill(victim, signal.SIGKILL)
  t0 = time.time()
  _, err = p.communicate(timeout=300)
  elapsed = time.time() - t0
  assert p.returncode != 0 and elapsed < 120, (p.returncode, elapsed, err[-3000:])
  assert f"launch: process 1 (pid {victim}) failed: killed by signal 9" in err, err[-3000:]
  assert "error: process 0: lost process 1 of 2" in err, err[-3000:]
  steps = RunDir(killed / "run").steps()
  assert steps and steps[-1] < 10
  p = launch_two(killed, *common)
  assert p.returncode == 0 and f"resumed from {killed / 'run' / 'checkpoints'}/{steps[-1]}" in p.stderr, \
      p.stderr[-3000:]
  want, got = logged(straight / "run"), logged(killed / "run")
  assert sorted(got) == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], atol=1e-6)
