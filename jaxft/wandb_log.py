"""Weights & Biases: the same metrics, config and samples as `metrics.jsonl`, on a W&B run.

Set `logging.wandb.project` and a run logs there as well: every metric line at its step, the
greedy samples as a table, the resolved config, and the final metrics (best step and why it
stopped included) as the run summary. Only the main process logs. The run's id is kept in
`W/wandb_run.json`, so a resumed training run continues the same W&B run instead of starting a
second one. `logging.wandb.mode` is W&B's own (`online`, `offline`, `disabled`; empty: W&B's
default or `WANDB_MODE`); files go under `W/wandb/`. `wandb` is an optional extra
(`pip install "jaxft[wandb]"`); asking for it without it installed is refused before any work.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

from jaxft.errors import JaxftError

RUN_FILE = "wandb_run.json"  # in the workdir: the W&B run id a resumed run continues
MODES = ("", "online", "offline", "disabled")


def requested(cfg: ml_collections.ConfigDict) -> bool:
    return bool(cfg.get("logging", {}).get("wandb", {}).get("project"))


def check(cfg: ml_collections.ConfigDict) -> None:
    """Refuse, in one line, a W&B setup that cannot work: run it before anything loads."""
    if not requested(cfg):
        return
    settings = cfg.logging.wandb
    if settings.mode not in MODES:
        raise JaxftError(f"config: logging.wandb.mode {settings.mode!r} is not one of "
                         f"{', '.join(repr(m) for m in MODES)}")
    if importlib.util.find_spec("wandb") is None:
        raise JaxftError("config: logging.wandb.project is set but wandb is not installed "
                         "(pip install \"jaxft[wandb]\", or leave logging.wandb.project empty)")


class WandbRun:
    """One W&B run of a training workdir (main process only)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: Path):
        import wandb

        settings = cfg.logging.wandb
        record = workdir / RUN_FILE
        run_id = json.loads(record.read_text())["id"] if record.is_file() else None
        self._wandb = wandb
        self.run = wandb.init(
            project=settings.project, entity=settings.entity or None,
            name=settings.name or workdir.name, tags=list(settings.tags) or None,
            config=cfg.to_dict(), dir=str(workdir), mode=settings.mode or None,
            id=run_id, resume="allow" if run_id else None, reinit="finish_previous")
        if run_id is None:
            record.write_text(json.dumps({"id": self.run.id}) + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """A metrics.jsonl line: numbers as charts, samples as a prompt/completion table."""
        row: dict[str, Any] = {k: v for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        samples = metrics.get("samples")
        if samples:
            row["samples"] = self._wandb.Table(
                columns=["prompt", "completion"],
                data=[[s["prompt"], s["completion"]] for s in samples])
        if row:
            self.run.log(row, step=step)

    def finish(self, final: dict[str, Any] | None = None) -> None:
        if final:
            for key, value in final.items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
        self.run.finish()
