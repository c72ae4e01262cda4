"""Which of the five data formats a file is in, and which of its columns hold what.

| format              | columns (names configurable)                   | trained tokens          |
|---------------------|------------------------------------------------|-------------------------|
| `text`              | text                                           | every token             |
| `prompt_completion` | prompt + completion, or instruction/input/output | completion + EOS      |
| `messages`          | messages: [{role, content}, ...]               | assistant turns         |
| `classification`    | text (+ optional text pair) + label            | - (one label per row)   |
| `preference`        | prompt + chosen + rejected (text or messages), | both responses (+ EOS   |
|                     | or chosen + rejected with the prompt inside    | for text), as pairs     |

`format='auto'` picks the first that fits the columns, in the order messages, prompt/completion,
instruction/output, text for a language-model task; a classification task needs classification,
and a `dpo` task needs preference (TRL's explicit- or implicit-prompt layout, see `preference.py`).
The instruction/input/output layout (Alpaca) becomes prompt/completion through the standard Alpaca
prompt, so the model sees the layout it was published with.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxft import tasks
from jaxft.data.config import FORMATS
from jaxft.errors import JaxftError
from jaxft.tasks import TASKS

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclasses.dataclass(frozen=True)
class Schema:
    """A format plus the column that plays each role in it, e.g. {'prompt': 'question'}."""

    format: str
    columns: dict[str, str]

    @property
    def alpaca(self) -> bool:
        return "instruction" in self.columns


def resolve(cfg: ml_collections.ConfigDict, found: list[str], task: str, where: str, *,
            optional: tuple[str, ...] = ()) -> Schema:
    """The schema for a dataset with columns `found`, or a one-line error listing both sides.
    Roles in `optional` (say 'label', for rows to predict) drop out of a schema when their
    column is not there."""
    if task not in TASKS:
        raise JaxftError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    fmt = cfg.format
    if fmt not in FORMATS:
        raise JaxftError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if task == tasks.CLASSIFICATION and fmt not in ("auto", "classification"):
        raise JaxftError(f"task 'classification' needs data.format 'classification', got {fmt!r}")
    if task == tasks.LM and fmt == "classification":
        raise JaxftError("data.format 'classification' needs task='classification'")
    if task == tasks.LM and fmt == "preference":
        raise JaxftError("data.format 'preference' needs task='dpo'")
    if task == tasks.DPO and fmt not in ("auto", "preference"):
        raise JaxftError(f"task 'dpo' needs data.format 'preference' (prompt/chosen/rejected "
                         f"columns), got {fmt!r}")
    candidates = [_present(s, found, optional) for s in _candidates(cfg, task)]
    if fmt != "auto":
        candidates = [s for s in candidates if s.format == fmt]
    for schema in candidates:
        if all(c in found for c in schema.columns.values()):
            return schema
    wanted = " or ".join(str(sorted(set(s.columns.values()))) for s in candidates)
    what = "detect the data format" if fmt == "auto" else f"read format '{fmt}'"
    raise JaxftError(f"{where}: cannot {what}: found columns {sorted(found)}, expected {wanted} "
                     f"(set data.format or data.*_column)")


def _candidates(cfg: ml_collections.ConfigDict, task: str) -> list[Schema]:
    if task == tasks.CLASSIFICATION:
        cols = {"text": cfg.text_column, "label": cfg.label_column}
        if cfg.text_pair_column:
            cols["text_pair"] = cfg.text_pair_column
        return [Schema("classification", cols)]
    if task == tasks.DPO:
        return [
            Schema("preference", {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column,
                                  "rejected": cfg.rejected_column}),
            Schema("preference", {"chosen": cfg.chosen_column, "rejected": cfg.rejected_column}),
        ]
    return [
        Schema("messages", {"messages": cfg.messages_column}),
        Schema("prompt_completion", {"prompt": cfg.prompt_column,
                                     "completion": cfg.completion_column}),
        Schema("prompt_completion", {"instruction": "instruction", "output": "output"}),
        Schema("text", {"text": cfg.text_column}),
    ]


def _present(schema: Schema, found: list[str], optional: tuple[str, ...]) -> Schema:
    """`schema` less its `optional` roles whose column is not among `found`."""
    return Schema(schema.format, {role: column for role, column in schema.columns.items()
                                  if role not in optional or column in found})


def require(schema: Schema, found: list[str], where: str) -> None:
    """Check that a second dataset (the eval file) has the columns the train file's schema uses."""
    missing = sorted(set(schema.columns.values()) - set(found))
    if missing:
        raise JaxftError(f"{where}: format '{schema.format}' needs columns "
                         f"{sorted(set(schema.columns.values()))} but found {sorted(found)}")


def alpaca_prompt(instruction: str, context: str | None) -> str:
    """The Alpaca prompt for one row; an empty `input` uses the no-input variant."""
    if context and context.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_NO_INPUT.format(instruction=instruction)
