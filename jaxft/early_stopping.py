"""Early stopping: end a run when its eval metric stops improving, and know its best step.

Small datasets overfit, full fine-tuning especially; the eval loss turns up while the train loss
keeps falling. With `train.early_stopping.enabled`, every eval (every `train.eval_every` steps)
is compared with the best so far: an improvement of more than `min_delta` (lower eval_loss;
higher eval_accuracy for classification, higher eval_reward for GRPO) makes that step the
best, and its trained weights are saved to `W/best_checkpoint` outside the keep-N rotation;
`patience` evals in a row without one stop the run. The tracker's state travels in every
checkpoint's metadata, so a resumed run counts on from where it was, as the Hugging Face
Trainer's `EarlyStoppingCallback` would had it not restarted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from jaxft import tasks

BEST_DIRECTORY = "best_checkpoint"  # in the workdir: one checkpoint, the best eval's weights


def metric_of(task: str) -> tuple[str, str]:
    """(the metric early stopping watches, 'min' or 'max') for a task."""
    if task == tasks.CLASSIFICATION:
        return "eval_accuracy", "max"
    if task == tasks.GRPO:  # the held-out prompts' mean reward
        return "eval_reward", "max"
    return "eval_loss", "min"


@dataclasses.dataclass
class EarlyStopping:
    """The best eval so far and how many evals since have not beaten it by `min_delta`."""

    patience: int
    min_delta: float
    metric: str
    mode: str  # 'min' or 'max'
    best_step: int | None = None
    best_value: float | None = None
    bad_evals: int = 0
    stopped_at: int | None = None

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict,
                    saved: dict[str, Any] | None = None) -> EarlyStopping | None:
        """The tracker of a run (None when early stopping is off), continuing `saved` state."""
        settings = cfg.train.early_stopping
        if not settings.enabled:
            return None
        metric, mode = metric_of(cfg.task)
        return cls(int(settings.patience), float(settings.min_delta), metric, mode,
                   **(saved or {}))

    def state(self) -> dict[str, Any]:
        """What a checkpoint's metadata keeps (JSON): the counter and the best so far."""
        return {"best_step": self.best_step, "best_value": self.best_value,
                "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Fold in one eval; True when it is the new best (its weights should be kept)."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            improved = False
        elif self.best_value is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best_value - self.min_delta
        else:
            improved = value > self.best_value + self.min_delta
        if improved:
            self.best_step, self.best_value, self.bad_evals = step, float(value), 0
        else:
            self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stopped_at = step
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def summary(self) -> dict[str, Any]:
        """The final metrics' account: the best step, its value, and why the run ended."""
        if self.should_stop:
            reason = (f"early stopping: {self.metric} did not improve by more than "
                      f"{self.min_delta:g} in {self.patience} evals after step {self.best_step}")
        else:
            reason = "reached train.steps"
        return {"best_step": self.best_step, f"best_{self.metric}": self.best_value,
                "stopped": reason}
