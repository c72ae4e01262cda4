"""`jaxft.plot`: a real 1200×800 PNG from metrics.jsonl, one-line errors for bad input, and a
plotting failure that never fails training."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxft import plot, train
from jaxft.errors import JaxftError
from tests.tiny_run import subprocess_env


def _write_metrics(workdir, records) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _run_like(steps: int = 20) -> list[dict]:
    """What jaxft.train writes: base eval at 0, train records, eval every 10, final eval."""
    records = [{"step": 0, "time": 1.0, "eval_loss": 4.0, "eval_perplexity": 54.6}]
    for s in range(1, steps + 1):
        records.append({"step": s, "time": 1.0 + s, "train_loss": 4.0 - 0.1 * s,
                        "lr": 1e-3 * min(1.0, s / 5), "grad_norm": 2.0 / s,
                        "tokens_per_s": 1000.0 + s, "skipped_steps": 0})
        if s % 10 == 0:
            records.append({"step": s, "time": 1.5 + s, "eval_loss": 4.0 - 0.08 * s})
    return records


def test_png_is_a_real_image_of_the_fixed_size(tmp_path):
    _write_metrics(tmp_path, _run_like())
    path = plot.plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1200, 800)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # curves, text and grid were drawn, not a blank canvas
    assert (pixels < 128).any()  # something dark (text, axes) on the white background


def test_a_preference_run_adds_its_reward_panel_at_the_same_size(tmp_path):
    _write_metrics(tmp_path / "lm", _run_like())
    records = _run_like()
    for r in records:
        if "train_loss" in r:
            r.update({"rewards/accuracies": min(1.0, r["step"] / 10), "rewards/margins": 0.1})
    _write_metrics(tmp_path / "dpo", records)
    plain, dpo = plot.plot_metrics(tmp_path / "lm"), plot.plot_metrics(tmp_path / "dpo")
    with Image.open(plain) as a, Image.open(dpo) as b:
        assert a.size == b.size == (1200, 800)
        # five panels in a 2×3 grid: the layout itself moved, not just one curve
        assert (np.asarray(a.convert("L")) != np.asarray(b.convert("L"))).mean() > 0.05


def test_series_keep_the_last_value_of_a_repeated_step(tmp_path):
    # A run resumed from a checkpoint at step 2 logs steps 3.. again.
    _write_metrics(tmp_path, [{"step": s, "train_loss": float(s)} for s in (1, 2, 3, 4)]
                   + [{"step": 3, "train_loss": 30.0}, {"step": 4, "train_loss": 40.0}])
    steps, values = plot.read_series(tmp_path)["train_loss"]
    assert steps == [1, 2, 3, 4] and values == [1.0, 2.0, 30.0, 40.0]


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ("", "metrics.jsonl: holds no metrics yet"),
    ('{"step": 1, "train_loss": 2.0}\n{"train_loss": 1.0}\n',
     "metrics.jsonl:2: not a metrics record with a step"),
    ('{"step": 1, "train_loss": 2.0}\nnot json\n',
     "metrics.jsonl:2: not a metrics record with a step"),
])
def test_bad_metrics_are_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(JaxftError) as e:
        plot.plot_metrics(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "metrics.png").exists()


@pytest.mark.slow
def test_command_line(tmp_path):
    _write_metrics(tmp_path / "run", _run_like(5))
    ok = subprocess.run([sys.executable, "-m", "jaxft.plot", f"--workdir={tmp_path / 'run'}",
                         f"--out={tmp_path / 'curves.png'}"], capture_output=True, text=True,
                        env=subprocess_env(1), timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert Image.open(tmp_path / "curves.png").size == (1200, 800)
    bad = subprocess.run([sys.executable, "-m", "jaxft.plot", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, env=subprocess_env(1), timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'metrics.jsonl'}: no such file (is {tmp_path} a jaxft.train "
        "workdir?)"]


def test_a_failing_plot_never_fails_training(tmp_path, caplog):
    # What train.run calls after a run: a workdir whose metrics cannot be plotted only warns.
    with caplog.at_level(logging.WARNING):
        train._write_plot(tmp_path)
    assert "no plot for" in caplog.text and "JaxftError" in caplog.text
