"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, mesh changes, bad steps."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxft import train
from tests.articles import write_articles
from tests.tiny_run import (
    DATA,
    GRPO_TINY,
    REPO,
    read_metrics,
    subprocess_env,
    tiny_config,
    tiny_model_dir,
    train_losses,
    write_config_file,
)

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", num_key_value_heads=2)


def streamed_corpus(path: Path) -> dict:
    """Overrides streaming a generated corpus (27 MB, 108 shards) through one worker:
    tokenizing it takes longer (~30 s) than starting and the first steps do."""
    write_articles(path, 6000)
    return {"data.train_path": str(path), "data.streaming": True, "data.num_workers": 1,
            "data.shard_mb": 0.25, "data.eval_fraction": 0.0}


def saved_state(workdir: Path, step: int) -> list[np.ndarray]:
    """Every array of a checkpoint's state, in tree order, as numpy."""
    tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxft.train", f"--config={config}"],
                            cwd=REPO, env=subprocess_env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and any(
                m.get("step", 0) >= step and "train_loss" in m for m in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-3000:])
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("mode", ["lora", "full", "dpo", "dpo_copy", "grpo", "streamed"])
def test_resume_after_sigkill_is_bitwise_exact(mode, model_dir, tmp_path):
    """`dpo`: full fine-tuning on preference pairs, whose reference log-probabilities are
    scored from the loaded weights on every start, so a resumed run must score exactly what the
    first start did, not the checkpoint's weights. `dpo_copy`: the same with the reference a
    frozen copy of the loaded weights, scoring each batch (taken before the restore). `grpo`:
    LoRA whose batches are its own sampled completions, scored, with a KL to its base, each
    batch trained twice (num_iterations 2): the resumed run must draw the same prompts, sample
    the same completions, and resume mid-batch (the checkpoint at step 3) on the batch it kept.
    `streamed`: full fine-tuning on a generated corpus streamed through one tokenizing worker
    (data.streaming), killed while shards are still being tokenized into a cache of its own:
    the resumed run keeps the finished shards, tokenizes the rest, and trains the same rows."""
    lora_run = mode in ("lora", "grpo")
    overrides = {"train.steps": 8, "checkpoint.every": 3, "lora.enabled": lora_run,
                 "optim.lr": 3e-3 if lora_run else 1e-3, "data.eval_fraction": 0.0,
                 "lora.dropout": 0.1 if lora_run else 0.0}
    if mode.startswith("dpo"):
        overrides.update({"task": "dpo", "dpo.precompute_ref": mode == "dpo",
                          "data.train_path": str(DATA / "support_preferences.jsonl")})
    if mode == "grpo":
        overrides.update({**GRPO_TINY, "grpo.beta": 0.04, "grpo.num_iterations": 2})
    if mode == "streamed":
        overrides.update({"lora.enabled": False, "optim.lr": 1e-3,
                          "data.cache_dir": str(tmp_path / "cache_killed"),
                          **streamed_corpus(tmp_path / "corpus.jsonl")})
    straight = tmp_path / "straight"
    train.run(tiny_config(model_dir, straight, **{**overrides, "data.cache_dir": str(
        tmp_path / "cache_straight")}))

    killed = tmp_path / "killed"
    config = write_config_file(tmp_path / "cfg.py", model_dir, killed, **overrides)
    proc = start(config)
    wait_for_step(killed, 4, proc)  # after checkpoint 3, before checkpoint 6
    while not (killed / "checkpoints" / "3").exists():  # committed (renamed) by Orbax
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if mode == "streamed":  # killed mid-tokenization: the cache holds some shards, not all
        metrics = [m for m in read_metrics(killed) if m.get("step") == 4]
        assert metrics[0].get("shards_to_tokenize", 0) > 0
    resumed_from = max(int(p.name) for p in (killed / "checkpoints").iterdir()
                       if p.name.isdigit())
    out = finish(start(config))
    assert f"resumed from {killed / 'checkpoints' / str(resumed_from)}" in out

    for a, b in zip(saved_state(straight, 8), saved_state(killed, 8), strict=True):
        np.testing.assert_array_equal(a, b)
    expected, got = train_losses(straight), train_losses(killed)
    for step in range(resumed_from + 1, 9):
        assert got[step] == expected[step]


def test_sigkill_during_async_saves_never_breaks_resume(model_dir, tmp_path):
    workdir = tmp_path / "run"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **{
        "train.steps": 40, "checkpoint.every": 1, "checkpoint.keep": 2,
        "data.eval_fraction": 0.0, "lora.enabled": False, "optim.lr": 1e-3})
    for delay in (0.0, 0.15, 0.4):  # kills land at different points of the save cycle
        proc = start(config)
        reached = 1 + max([m["step"] for m in read_metrics(workdir) if "train_loss" in m]
                          if (workdir / "metrics.jsonl").exists() else [0])
        wait_for_step(workdir, reached + 2, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = finish(start(config))
    assert "resumed from" in out
    assert max(m["step"] for m in read_metrics(workdir)) == 40


def test_sigterm_saves_and_exits_zero(model_dir, tmp_path):
    workdir = tmp_path / "run"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **{
        "train.steps": 500, "checkpoint.every": 0, "data.eval_fraction": 0.0})
    proc = start(config)
    wait_for_step(workdir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "preempted: saved step" in out
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2


def test_checkpoint_restores_onto_another_mesh(model_dir, tmp_path):
    overrides = {"train.steps": 6, "checkpoint.every": 3, "lora.enabled": False,
                 "optim.lr": 1e-3, "data.eval_fraction": 0.0}
    straight = tmp_path / "straight"
    train.run(tiny_config(model_dir, straight, **overrides, **{"mesh.data": 8}))
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    shutil.rmtree(moved / "checkpoints" / "6")
    train.run(tiny_config(model_dir, moved, **overrides, **{
        "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    expected = train_losses(straight)
    # The resume drops the copied rows after step 3, so steps 4-6 are the moved run's own.
    rows = [m for m in read_metrics(moved) if "train_loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    got = {m["step"]: m["train_loss"] for m in rows}
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)],
                               rtol=1e-4)


def test_corrupted_latest_checkpoint_is_skipped(model_dir, tmp_path, caplog):
    overrides = {"train.steps": 6, "checkpoint.every": 3, "data.eval_fraction": 0.0}
    workdir = tmp_path / "run"
    train.run(tiny_config(model_dir, workdir, **overrides))
    for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    final = train.run(tiny_config(model_dir, workdir, **{**overrides, "train.steps": 7}))
    assert final["step"] == 7
    assert any(f"skipping checkpoint {workdir / 'checkpoints' / '6'}" in r.getMessage()
               for r in caplog.records)
    steps = [m["step"] for m in read_metrics(workdir) if "train_loss" in m]
    assert steps[-4:] == [4, 5, 6, 7]  # resumed from 3


def test_lora_checkpoint_is_adapter_sized(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model", "llama", hidden_size=128,
                               intermediate_size=256, num_hidden_layers=4)
    workdir = tmp_path / "run"
    train.run(tiny_config(model_dir, workdir, **{"train.steps": 1, "lora.rank": 2,
                                                 "lora.targets": ("q_proj", "v_proj")}))
    # layers × float32 × (q, v) × (A [128, 2] + B [2, 4 heads × head_dim 16]: the tiny config's)
    adapter_bytes = 4 * 4 * 2 * (2 * 128 + 2 * 64)
    on_disk = sum(f.stat().st_size for f in (workdir / "checkpoints" / "1").rglob("*")
                  if f.is_file())
    base_bytes = os.path.getsize(model_dir / "model.safetensors")
    # What it holds: the adapters and their two AdamW moments (and a few step counters)...
    held = sum(x.nbytes for x in saved_state(workdir, 1))
    assert 3 * adapter_bytes <= held <= 3 * adapter_bytes + 64
    # ...and on disk, with Orbax's metadata (OCDBT keeps superseded index nodes, so how much
    # varies with how its writes were batched), nowhere near the base model.
    assert 3 * adapter_bytes <= on_disk + 4096
    assert on_disk < base_bytes / 8
