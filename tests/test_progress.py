"""Progress bars: drawn on a terminal, absent from pipes and logs, and gone with --noprogress."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from jaxft import evaluate as E
from jaxft import plan, progress, train
from jaxft.workdir import load_run
from tests.tiny_run import tiny_config, tiny_model_dir

REPO = Path(__file__).parents[1]


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is, and keeps what was drawn."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("progress")
    model = tiny_model_dir(root / "model")
    train.run(tiny_config(model, root / "run", **{"train.steps": 2}))
    return model, root / "run"


def _stderr_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run `python -m jaxft.<args>` with stderr on a 120-column pseudo-terminal."""
    master, slave = pty.openpty()
    # a fresh pseudo-terminal is 0 x 0, where tqdm draws nothing; a user's is not
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    code = proc.wait(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_the_command_line_draws_bars_on_a_terminal_unless_told_not_to(run, tmp_path) -> None:
    _, workdir = run
    args = ["jaxft.export", f"--workdir={workdir}", "--merged"]
    code, shown = _stderr_on_a_terminal([*args, f"--out={tmp_path / 'a'}"])
    assert code == 0, shown[-2000:]
    assert "loading weights" in shown and "tensor/s" in shown and "exporting" in shown, shown
    code, quiet = _stderr_on_a_terminal([*args, f"--out={tmp_path / 'b'}", "--noprogress"])
    assert code == 0 and "loading weights" not in quiet and "exporting" not in quiet, quiet


def test_evaluation_training_and_the_dry_run_report(run, tmp_path, monkeypatch) -> None:
    model, workdir = run
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    E.run(None, str(workdir))
    cfg = tiny_config(model, tmp_path / "w", **{"train.steps": 2})
    plan.make_plan(cfg)
    train.run(cfg)
    drawn = terminal.getvalue()
    for text in ("loading weights", "evaluating", "compiling the train step", "training",
                 "step/s"):
        assert text in drawn, text


def test_nothing_is_drawn_on_a_pipe_or_when_disabled(run, monkeypatch) -> None:
    _, workdir = run
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    load_run(workdir)
    assert "loading weights" not in pipe.getvalue()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress.enable(False)
    try:
        load_run(workdir)
    finally:
        progress.enable(True)
    assert "loading weights" not in terminal.getvalue()
