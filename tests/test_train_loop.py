"""The training loop: no host sync between log steps, the logged loss is the window's mean,
SIGTERM is handled from the start, and a stop is the last thing on the screen."""

import dataclasses
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxft
from jaxft import data, export, train, train_step
from tests.test_checkpoint import wait_for_step
from tests.tiny_run import (
    REPO,
    nan_at_step,
    read_metrics,
    subprocess_env,
    tiny_config,
    tiny_model_dir,
    write_config_file,
)
from tests.transfer_guard import TransferRefused, enforce_on_cpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def test_steps_between_host_reads_never_copy_from_the_devices(model_dir, tmp_path, monkeypatch):
    """Between two log steps the loop reads nothing from the devices: not one device-to-host
    read while batches 2 to 7 of an 8-step window are fetched and trained on. Those steps run
    under the loop's transfer guard, which refuses any read (shown by slipping one in). On the
    CPU reads are counted and the guard enforced by `tests.transfer_guard`."""
    reads = enforce_on_cpu(monkeypatch)
    with jax.transfer_guard_device_to_host("disallow"), pytest.raises(TransferRefused):
        bool(jax.numpy.ones(()) > 0)  # the emulation is on
    reads_at_batch = []

    def counting(build):
        def build_counting(*args, **kwargs):
            bundle = build(*args, **kwargs)
            return dataclasses.replace(bundle, train=_Counted(bundle.train, reads,
                                                              reads_at_batch))
        return build_counting

    monkeypatch.setattr(data, "build_data", counting(data.build_data))
    train.run(tiny_config(model_dir, tmp_path / "run", **{"train.steps": 8,
                                                          "train.log_every": 8}))
    assert len(reads_at_batch) == 8
    assert reads_at_batch[6] - reads_at_batch[1] == 0  # none while steps 2 to 6 ran

    # A read slipped into every step (here: where the step's number is made) is refused.
    number = train_step.step_number
    monkeypatch.setattr(train_step, "step_number",
                        lambda n: number(int(jax.device_get(jax.numpy.asarray(n)))))
    with pytest.raises(TransferRefused, match="disallow_explicit"):
        train.run(tiny_config(model_dir, tmp_path / "syncing", **{"train.steps": 4,
                                                                   "train.log_every": 4}))


class _Counted:
    """A train iterator noting how many device reads had happened as each batch is fetched."""

    def __init__(self, inner, reads, marks: list):
        self.inner, self.reads, self.marks = inner, reads, marks

    def __next__(self):
        self.marks.append(self.reads.count)
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_nonfinite_steps_are_counted_on_the_device_and_never_saved(model_dir, tmp_path,
                                                                   monkeypatch):
    """A NaN at step 2 is skipped on the device, counted at the next read (step 4), and no
    checkpoint holds a post-NaN state; with `train.on_nonfinite=stop` the run stops there."""
    nan_at_step(monkeypatch, 2)
    cfg = tiny_config(model_dir, tmp_path, **{
        "train.steps": 8, "train.log_every": 4, "train.eval_every": 4, "checkpoint.every": 4,
        "data.eval_fraction": 0.25, "train.sample_prompts": ("Where is my order?",),
        "train.sample_tokens": 4})
    final = train.run(cfg)
    assert final["step"] == 8 and final["skipped_steps"] == 1
    logged = {m["step"]: m for m in read_metrics(tmp_path) if "train_loss" in m}
    assert sorted(logged) == [4, 8] and logged[4]["skipped_steps"] == 1
    assert all(np.isfinite(m["train_loss"]) for m in logged.values())
    for step in (4, 8):
        state = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    # train.on_nonfinite='stop': the run ends at the bad step, after the last good save
    stop = tmp_path / "stop"
    with pytest.raises(jaxft.JaxftError, match=r"step 2: loss or gradient is not finite; "
                       r"stopped without saving \(last checkpoint: \[1\]\)"):
        train.run(tiny_config(model_dir, stop, **{
            "train.steps": 5, "checkpoint.every": 1, "train.on_nonfinite": "stop"}))
    assert sorted(p.name for p in (stop / "checkpoints").iterdir()) == ["1"]


@pytest.mark.slow
def test_logged_loss_is_the_token_weighted_mean_of_its_window(model_dir, tmp_path):
    every_step = tiny_config(model_dir, tmp_path / "each", **{"train.steps": 6})
    train.run(every_step)
    per_step = {m["step"]: m for m in read_metrics(tmp_path / "each") if "train_loss" in m}
    windowed = tiny_config(model_dir, tmp_path / "window", **{"train.steps": 6,
                                                               "train.log_every": 3})
    train.run(windowed)
    logged = {m["step"]: m for m in read_metrics(tmp_path / "window") if "train_loss" in m}
    assert sorted(logged) == [3, 6]
    for end in (3, 6):
        window = [per_step[s] for s in range(end - 2, end + 1)]
        tokens = [m["train_tokens"] for m in window]
        assert logged[end]["train_tokens"] == sum(tokens)
        mean = sum(m["train_loss"] * n for m, n in zip(window, tokens, strict=True)) / sum(tokens)
        np.testing.assert_allclose(logged[end]["train_loss"], mean, rtol=1e-6)
        assert logged[end]["grad_norm"] == per_step[end]["grad_norm"]  # the last step's
    assert len({round(m["train_loss"], 6) for m in per_step.values()}) > 1  # windows differ


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_a_resumed_run_logs_each_step_once(model_dir, tmp_path):
    """A run whose last checkpoint is behind what it logged (killed between a log line and the
    next save) runs those steps again on resume; metrics.jsonl keeps one line per step."""
    overrides = {"train.steps": 4, "checkpoint.every": 2, "data.eval_fraction": 0.2,
                 "train.eval_every": 2}
    train.run(tiny_config(model_dir, tmp_path, **overrides))
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed before the last save
    train.run(tiny_config(model_dir, tmp_path, **overrides))
    records = read_metrics(tmp_path)
    trained = [m["step"] for m in records if "train_loss" in m]
    evaluated = [m["step"] for m in records if "eval_loss" in m]
    assert trained == [1, 2, 3, 4] and evaluated == [0, 2, 4]


def test_epochs_count_passes_over_the_train_rows(model_dir, tmp_path, capsys):
    """`train.epochs` instead of `train.steps`: the steps are epochs × rows per epoch / batch
    size, rounded up, and the schedule decays over them."""
    cfg = tiny_config(model_dir, tmp_path, **{"train.epochs": 3.0, "optim.schedule": "linear"})
    tokenizer = data.load_tokenizer(str(model_dir))
    rows = data.build_data(cfg.data, tokenizer, global_batch_size=8).stats["rows_per_epoch"]
    steps = -(-3 * rows // 8)
    assert steps != cfg.train.steps  # (5, which epochs replace)
    final = train.run(cfg)
    assert final["step"] == steps
    assert f"train: {steps} steps of 8 rows = {steps * 8 / rows:.2f} epochs of the {rows} " \
        "train rows" in capsys.readouterr().out
    lr = {m["step"]: m["lr"] for m in read_metrics(tmp_path) if "lr" in m}
    decay = optax.linear_schedule(3e-3, 3e-4, steps)  # lr to lr × final_lr_ratio over the steps
    assert lr[steps] == pytest.approx(float(decay(steps - 1)), rel=1e-5)


def test_run_restores_the_sigterm_handler_it_found(model_dir, tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.run(tiny_config(model_dir, tmp_path, **{"train.steps": 1}))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def signalled_while_loading(config, *signals: int) -> tuple[str, str, int]:
    """A `jaxft.train` child sent `signals` (0.2 s apart) once it prints its data line, which
    comes before the model loads and the step compiles; its (stdout, stderr, exit code)."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxft.train", f"--config={config}"],
                            cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    before = []
    for line in proc.stdout:
        before.append(line)
        if line.startswith("data: "):
            for i, sig in enumerate(signals):
                time.sleep(0.2 if i else 0)
                proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return "".join(before) + out, err, proc.returncode


@pytest.mark.slow
def test_sigterm_while_loading_exits_zero_without_training(model_dir, tmp_path):
    workdir = tmp_path / "run"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **{"train.steps": 3})
    out, err, code = signalled_while_loading(config, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "preempted before training resumed at step 0; rerun to go on" in out
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_and_says_how_to_resume(model_dir, tmp_path):
    """Ctrl-C (SIGINT) in the middle of training saves at the next step boundary and stops
    with exit code 130 and a last line saying where it saved and how to go on; the same
    command resumes from there."""
    workdir = tmp_path / "run"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **{
        "train.steps": 500, "checkpoint.every": 0, "data.eval_fraction": 0.0})
    command = [sys.executable, "-m", "jaxft.train", f"--config={config}", "--noprogress"]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(workdir, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2
    assert out.strip().splitlines()[-1] == (
        f"stopped (Ctrl-C): saved step {saved[0]} to {workdir.absolute() / 'checkpoints'}; run "
        "the same command again to resume")
    write_config_file(tmp_path / "short.py", model_dir, workdir, **{
        "train.steps": saved[0] + 1, "checkpoint.every": 0, "data.eval_fraction": 0.0})
    again = subprocess.run([sys.executable, "-m", "jaxft.train",
                            f"--config={tmp_path / 'short.py'}", "--noprogress"], cwd=REPO,
                           env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {workdir.absolute() / 'checkpoints' / str(saved[0])}" in again.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_in_one_line(model_dir, tmp_path):
    """Two Ctrl-Cs while the model loads: no waiting for a step, one line, exit code 130."""
    workdir = tmp_path / "run"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **{"train.steps": 3})
    _, err, code = signalled_while_loading(config, signal.SIGINT, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "aborted (a second Ctrl-C): checkpoints saved before are kept; run the same command "
        "again to resume from the latest")


@pytest.mark.slow
def test_stop_on_a_nonfinite_step_is_the_last_line(model_dir, tmp_path):
    """The progress bar is closed before the error is printed, so the error stays visible."""
    config = write_config_file(tmp_path / "cfg.py", model_dir, tmp_path / "run", nan_at=3, **{
        "train.steps": 6, "train.log_every": 2, "train.on_nonfinite": "stop"})
    done = subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={config}"],
                          cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last == ("error: step 3: loss or gradient is not finite; stopped without saving "
                    "(last checkpoint: none)"), done.stderr[-2000:]
    with pytest.raises(jaxft.JaxftError, match="no checkpoint"):
        export.export_workdir(tmp_path / "run", tmp_path / "out")
