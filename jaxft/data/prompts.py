"""Prompts for GRPO: rows with a `prompt` (text, or a conversation as TRL's prompt-only format
has it), every other column passed to the reward functions; visited in a seeded order that
depends only on the seed and the step, so a resumed run draws the prompts an uninterrupted one
draws.

Train and eval prompts come from `data.train_path` / `data.eval_path` exactly as the other
tasks' rows do (files, hub datasets, `chatterbot:prompts`; the same hold-out rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxft.data import sources
from jaxft.data.files import Loaded
from jaxft.data.order import epoch_order
from jaxft.errors import JaxftError

PROMPT = "prompt"
_INTERNAL = ("_file", "_row")  # where a row came from, added by the readers


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompt rows: `prompts[i]` (a string or a message list) and its extra `columns`."""

    prompts: list[Any]
    columns: dict[str, list]
    origin: str

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: Sequence[int]) -> tuple[list[Any], dict[str, list]]:
        """The prompts at `indices` and their columns, in that order."""
        return ([self.prompts[i] for i in indices],
                {k: [v[i] for i in indices] for k, v in self.columns.items()})


def _prompts(loaded: Loaded) -> Prompts:
    names = [c for c in loaded.rows.column_names if c not in _INTERNAL]
    if PROMPT not in names:
        raise JaxftError(f"{loaded.origin}: no '{PROMPT}' column for task 'grpo' (found: "
                         f"{', '.join(names) or 'none'}); each row needs a prompt, as text or "
                         "as a list of messages")
    rows = loaded.rows.to_dict()
    prompts = rows.pop(PROMPT)
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) and prompt.strip()) and not (
                isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)):
            raise JaxftError(f"{loaded.origin}: row {i + 1}: '{PROMPT}' is neither a non-empty "
                             "text nor a list of {role, content} messages")
    return Prompts(prompts, {k: rows[k] for k in names if k != PROMPT}, str(loaded.origin))


def load_prompts(cfg: ml_collections.ConfigDict) -> tuple[Prompts, Prompts | None]:
    """(train, eval or None) prompts named by a data config."""
    split = sources.load_split(cfg.train_path, cfg.eval_path, eval_fraction=cfg.eval_fraction,
                               seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows,
                               text_column=cfg.text_column)
    return _prompts(split.train), (None if split.eval is None else _prompts(split.eval))


class PromptOrder:
    """The prompts of each step: `per_step` indices taken in turn from a fresh seeded
    permutation of every prompt per epoch (`data.order.epoch_order`). Its state is the number
    of steps drawn."""

    def __init__(self, count: int, per_step: int, seed: int):
        if count < 1:
            raise JaxftError("no prompts to train on")
        self.count, self.per_step, self.seed = count, per_step, seed
        self.steps = 0
        self._orders: dict[int, np.ndarray] = {}

    def _at(self, position: int) -> int:
        epoch, index = divmod(position, self.count)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.count, self.seed, epoch)}
        return int(self._orders[epoch][index])

    def __next__(self) -> list[int]:
        start = self.steps * self.per_step
        self.steps += 1
        return [self._at(p) for p in range(start, start + self.per_step)]

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def set_state(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


@dataclasses.dataclass
class PromptBundle:
    """GRPO's data for the training loop: the train prompts and their order (the loop's
    `train`, whose state checkpoints carry), the held-out prompts, and the counts the loop
    prints. A row of the batch is one completion: an epoch is every prompt × num_generations."""

    prompts: Prompts
    train: PromptOrder
    eval: Prompts | None
    seq_len: int
    num_generations: int
    sequences_per_row: int = 1
    chat_template: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def stats(self) -> dict[str, int]:
        return {"rows_per_epoch": len(self.prompts) * self.num_generations,
                "examples": len(self.prompts)}

    def describe(self) -> str:
        held = f" + {len(self.eval):,} eval" if self.eval is not None else ""
        return (f"prompts, {len(self.prompts):,} train{held} prompts "
                f"({self.prompts.origin}), {self.num_generations} completions each, rows of "
                f"{self.seq_len} tokens")

    @property
    def conversational(self) -> bool:
        """Whether the prompts are conversations (rendered with the chat template)."""
        return any(not isinstance(p, str) for p in self.prompts.prompts)

    def next_prompts(self) -> tuple[list[Any], dict[str, list]]:
        return self.prompts.take(next(self.train))


def build_prompts(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                  num_generations: int, seed: int) -> PromptBundle:
    """The prompt data of a GRPO run: `global_batch_size / num_generations` prompts a step."""
    train, held_out = load_prompts(cfg)
    order = PromptOrder(len(train), global_batch_size // num_generations, seed)
    return PromptBundle(train, order, held_out, cfg.max_len, num_generations)
