"""Progress bars: drawn on a terminal, absent from pipes and logs, and gone when disabled.

The command line on a real pseudo-terminal (bars, and none with --noprogress) is tested with
the GGUF export in tests/test_gguf_export.py; here the in-process waits of one run.
"""

from __future__ import annotations

import io
import sys

import pytest

from jaxft import evaluate as E
from jaxft import plan, progress, train
from jaxft.workdir import load_run
from tests.tiny_run import tiny_config, tiny_model_dir


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is, and keeps what was drawn."""

    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_every_long_wait_reports_on_a_terminal_only(tmp_path, monkeypatch) -> None:
    model = tiny_model_dir(tmp_path / "model")
    cfg = tiny_config(model, tmp_path / "run", **{"train.steps": 2})
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    plan.make_plan(cfg)
    train.run(cfg)
    E.run(None, str(tmp_path / "run"))
    drawn = terminal.getvalue()
    for text in ("loading weights", "tensor/s", "evaluating", "compiling the train step",
                 "training", "step/s"):
        assert text in drawn, text

    pipe = io.StringIO()  # not a terminal: nothing drawn
    monkeypatch.setattr(sys, "stderr", pipe)
    load_run(tmp_path / "run")
    assert "loading weights" not in pipe.getvalue()
    quiet = _Terminal()  # a terminal, with bars turned off (--noprogress)
    monkeypatch.setattr(sys, "stderr", quiet)
    progress.enable(False)
    try:
        load_run(tmp_path / "run")
    finally:
        progress.enable(True)
    assert "loading weights" not in quiet.getvalue()
