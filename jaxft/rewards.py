"""Reward functions for GRPO, written as TRL users write them, and a few built-ins.

A reward function is a Python callable

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

called once per batch with one entry per completion: `prompts` (each repeated for its group),
`completions` (text for text prompts; `[{"role": "assistant", "content": text}]` for
conversational ones, as TRL passes them), the completions' token ids, and every other column of
the prompt data, repeated alike. None means "cannot score this one" (TRL's convention). A config
names functions as `module:function` (`my_rewards:exact`, a module importable from the working
directory) or by a built-in's name (`exact_answer`); a name that does not resolve is refused in
one line before any weight loads, and a function that raises or returns the wrong number of
rewards stops the run with one line naming it.

Built-ins (each reads the completion's text):
- `exact_answer`: 1 when the completion, stripped and case-folded, is the row's `answer`;
- `contains_answer`: 1 when the row's `answer` appears in the completion (case-folded);
- `one_sentence`: 1 for a completion of one sentence of at most 12 words that ends with a full
  stop, question or exclamation mark; 0.5 for one sentence without it; 0 for more.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxft.errors import JaxftError, first_line

RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """The text of a completion as reward functions receive it (text or a message list)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def _normal(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _answers(columns: dict[str, list], name: str) -> list:
    if "answer" not in columns:
        raise JaxftError(f"reward {name!r} compares with the data's 'answer' column, which the "
                         f"prompt data lacks (its columns: {', '.join(sorted(columns)) or 'none'})")
    return columns["answer"]


def exact_answer(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 where the completion is exactly the row's `answer` (whitespace and case aside)."""
    answers = _answers(columns, "exact_answer")
    return [float(_normal(completion_text(c)).strip(" .!") == _normal(a).strip(" .!"))
            for c, a in zip(completions, answers, strict=True)]


def contains_answer(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 where the row's `answer` appears in the completion (case aside)."""
    answers = _answers(columns, "contains_answer")
    return [float(_normal(a) in _normal(completion_text(c)))
            for c, a in zip(completions, answers, strict=True)]


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def one_sentence(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """A brevity target a small model can learn: one sentence of at most 12 words."""
    out = []
    for completion in completions:
        text = completion_text(completion).strip()
        ends = _SENTENCE_END.findall(text)
        words = len(text.split())
        if not text or words > 12 or len(ends) > 1:
            out.append(0.0)
        elif len(ends) == 1 and text[-1] in ".!?":
            out.append(1.0)
        else:
            out.append(0.5)
    return out


BUILT_INS: dict[str, RewardFn] = {"exact_answer": exact_answer,
                                  "contains_answer": contains_answer,
                                  "one_sentence": one_sentence}


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str  # as TRL names it in metrics: the function's __name__
    fn: RewardFn
    weight: float


def resolve(names: Sequence[str], weights: Sequence[float] = ()) -> list[Reward]:
    """The reward functions a config names, with their weights; one line for a name that does
    not import or is not callable, or weights that do not match."""
    if not names:
        raise JaxftError("config: grpo.reward_funcs is empty (name at least one reward "
                         f"function: 'module:function' or one of {', '.join(BUILT_INS)})")
    if weights and len(weights) != len(names):
        raise JaxftError(f"config: grpo.reward_weights has {len(weights)} weights for "
                         f"{len(names)} reward functions")
    found = []
    for i, name in enumerate(names):
        fn = _load(name)
        found.append(Reward(getattr(fn, "__name__", name.rpartition(":")[2]), fn,
                            float(weights[i]) if weights else 1.0))
    return found


def _load(name: str) -> RewardFn:
    if ":" not in name:
        if name in BUILT_INS:
            return BUILT_INS[name]
        raise JaxftError(f"config: grpo.reward_funcs entry {name!r} is neither 'module:function' "
                         f"nor a built-in ({', '.join(BUILT_INS)})")
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `my_rewards:fn` beside the command, as `python -m` has
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (ImportError, or whatever the module raises)
        raise JaxftError(f"config: grpo.reward_funcs entry {name!r}: module {module_name!r} does "
                         f"not import ({first_line(e)})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise JaxftError(f"config: grpo.reward_funcs entry {name!r}: {module_name} has no "
                         f"function {attribute!r}")
    return fn


def score(rewards: Sequence[Reward], prompts: list, completions: list,
          completion_ids: list[list[int]], columns: dict[str, list]) -> np.ndarray:
    """Every function's rewards [N, F] (NaN where one returned None); one line naming the
    function when it raises or returns something else than one number or None a completion."""
    out = np.full((len(completions), len(rewards)), np.nan, np.float32)
    for j, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts=prompts, completions=completions,
                               completion_ids=completion_ids, **columns)
        except JaxftError:
            raise
        except Exception as e:  # noqa: BLE001  (the user's code: any error is its own)
            raise JaxftError(f"reward function {reward.name!r} raised {first_line(e)}"
                             ) from None
        try:
            values = list(values)
        except TypeError:
            values = None
        if values is None or len(values) != len(completions):
            got = "no list" if values is None else f"{len(values)} rewards"
            raise JaxftError(f"reward function {reward.name!r} returned {got} for "
                             f"{len(completions)} completions (one float or None each)")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
                raise JaxftError(f"reward function {reward.name!r} returned {value!r} for "
                                 f"completion {i} (a finite number or None expected)")
            out[i, j] = float(value)
    return out
