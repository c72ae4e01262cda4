"""What the user watches: a progress bar, `metrics.jsonl`, and TensorBoard event files; and the
log window, what the host gathers between two log lines.

Only the main process writes; every other process gets a writer that does nothing, so the
training loop never branches on the process index. The writer owns the bar: lines printed
while it runs go above it (`say`), and `close` ends it, so an error or the final summary
printed afterwards is the last thing on the screen, not a redrawn bar.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxft import dpo, grpo, progress, tasks

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends `{"step": …, metric: value}` lines to workdir/metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, wandb: Any = None,
                 resumed_at: int = 0):
        """`wandb`: a `jaxft.wandb_log.WandbRun` to log the same lines to, or None.
        `resumed_at`: the step a resumed run restarts from; what the interrupted run logged
        after it is dropped (those steps run again), so each step keeps one line."""
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        self._wandb = wandb if enabled else None
        self._bar: Progress | None = None
        if enabled:
            if resumed_at:
                self._forget_after(resumed_at)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                         **({"purge_step": resumed_at + 1} if resumed_at else {}))
            except ImportError:  # TensorBoard files are a convenience, metrics.jsonl the record
                self._tb = None

    def _forget_after(self, step: int) -> None:
        """Drop the lines of steps after `step` (replaced in one rename: never half-written)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(kept))
            temporary.replace(self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or not metrics:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)
                elif name == "samples":  # generated text, one entry per fixed prompt
                    for i, sample in enumerate(value):
                        self._tb.add_text(f"sample_{i}", f"**{sample['prompt']}**\n\n"
                                          f"{sample['completion']}", step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def progress(self, total: int, initial: int) -> Progress:
        self._bar = Progress(total, initial, enabled=self.enabled)
        return self._bar

    def say(self, message: str) -> None:
        """Print a line (main process only) without breaking the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def finish(self, final: dict[str, Any]) -> None:
        """The run's final metrics, as the W&B run's summary (metrics.jsonl has them already)."""
        if self._wandb is not None:
            self._wandb.finish(final)
            self._wandb = None

    def close(self) -> None:
        if self._wandb is not None:  # an error or preemption: end the W&B run as it stands
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step_of(line: str) -> int:
    """A metrics line's step (a line that does not parse is kept: -1)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


class Progress:
    """A tqdm bar showing loss, learning rate, tokens/s; tqdm itself estimates the ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool):
        self.bar = progress.bar(total, desc="training", unit="step", initial=initial,
                                leave=True, disable=not enabled)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.bar.update(step - self.bar.n)
        if metrics:
            self.bar.set_postfix(
                loss=f"{metrics.get('train_loss', float('nan')):.4f}",
                lr=f"{metrics.get('lr', 0.0):.2e}",
                tok_s=f"{metrics.get('tokens_per_s', 0.0):,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class LogWindow:
    """What the host gathers from the train step's device windows between two log lines: the
    train loss is the token-weighted mean over every finite step of the window (as the Hugging
    Face Trainer averages over its logging steps), not the last step's."""

    def __init__(self, task: str, sum_names: tuple[str, ...]):
        self.task = task
        self.sums = dict.fromkeys(sum_names, 0.0)
        self.tokens = 0  # processed tokens, padding included (for tokens/s)
        self.started = time.perf_counter()
        self.grad_norm = float("nan")
        self.first_nonfinite = 0
        self.host: dict[str, list[float]] = {}  # host-side values per step (GRPO's rollouts)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time that is not training (an eval, a save) is left out of tokens/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def add_host(self, metrics: dict[str, float]) -> None:
        """One step's host-side metrics (a rollout's rewards and lengths); the log line shows
        each one's mean over the window's steps."""
        for k, v in metrics.items():
            self.host.setdefault(k, []).append(float(v))

    def add(self, window: dict[str, Any]) -> int:
        """Fold in a window read from the devices; returns its number of non-finite steps."""
        for k in self.sums:  # scalars, and a mixture of experts' load per expert
            value = np.asarray(window[k], np.float64)
            self.sums[k] = self.sums[k] + (value if value.ndim else float(value))
        self.grad_norm = float(window["grad_norm"])
        if window["nonfinite"] and not self.first_nonfinite:
            self.first_nonfinite = int(window["first_nonfinite"])
        return int(window["nonfinite"])

    def metrics(self) -> dict[str, float]:
        count = max(self.sums["count"], 1.0)
        out = {"train_loss": self.sums["loss_sum"] / count if self.sums["count"] else
               float("nan"), "grad_norm": self.grad_norm,
               "tokens_per_s": self.tokens / max(time.perf_counter() - self.started, 1e-9)}
        if self.task == tasks.GRPO:  # per completion token, under TRL's names
            out.update(grpo.metrics(self.sums))
            out["train_tokens"] = int(self.sums["tokens"])
        elif self.task == tasks.DPO:  # per pair, under TRL's names
            out.update({k: v for k, v in dpo.metrics(self.sums).items() if k != "loss"})
            out["train_pairs"] = int(self.sums["count"])
        elif self.task == tasks.CLASSIFICATION:  # one label per row
            out["train_accuracy"] = self.sums["correct"] / count
            out["train_examples"] = int(self.sums["count"])
        else:  # the tokens the loss was taken on (padding and prompts excluded)
            out["train_tokens"] = int(self.sums["count"])
        if "expert_load" in self.sums:
            out.update(router_metrics(self.sums["aux_loss_sum"] / count,
                                      np.asarray(self.sums["expert_load"])))
        with np.errstate(invalid="ignore"):
            out.update({k: float(np.nanmean(v)) for k, v in self.host.items()})
        return out


def router_metrics(aux_loss: float, load: np.ndarray) -> dict[str, float]:
    """A mixture of experts' routing as log scalars: transformers' load-balancing loss, and the
    busiest and idlest experts' shares of the tokens' expert choices as multiples of an even
    share (1.0 each when perfectly balanced; 0 for an expert no token chose)."""
    even = max(float(load.sum()), 1.0) / len(load)
    return {"router_aux_loss": float(aux_loss), "expert_load_max": float(load.max()) / even,
            "expert_load_min": float(load.min()) / even}
