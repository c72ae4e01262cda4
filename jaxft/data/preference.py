"""Preference pairs (task 'dpo'): TRL's `DPOTrainer` data formats, tokenized as TRL tokenizes them.

A row is `{prompt, chosen, rejected}`, each a text or, in the conversational form, a list of
`{role, content}` messages (the prompt's turns; each response's assistant turn). A row with only
`{chosen, rejected}` holds two whole texts or conversations that share their beginning: the
prompt is their common beginning, as TRL's `extract_prompt` finds it.

Tokens, exactly as TRL 1.x makes them, so a pair trains on the same sequences in both:
- text: `tokenizer(prompt)` (its BOS included) and `tokenizer(prompt + response + EOS)`, the
  EOS appended as text unless the response already ends with it;
- conversational: the chat template renders the prompt with the generation prompt, and the
  prompt followed by each response.
The response starts where the prompt's tokens and the whole sequence's first differ (the
shorter common run over both responses), so a token merged across the boundary, or a template
that renders a lone prompt differently, leaves no prompt token inside the response.

Truncation, stated and counted (`truncated` pairs): with `data.max_prompt_len` > 0 a longer
prompt keeps its last `max_prompt_len` tokens (the end, next to the answer); then each of
prompt + chosen and prompt + rejected keeps its first `data.max_len` tokens (TRL's
`keep_start`), or the pair is dropped and counted with `data.overlong='drop'`. A prompt that
leaves no room for a response, a response with no tokens, and chosen equal to rejected are the
row's error (skipped and counted with `data.skip_bad_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from jaxft.data import chat
from jaxft.errors import first_line


class BadPair(ValueError):
    """One row cannot be a preference pair; the caller adds the row's location."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """A tokenized pair: the shared prompt's ids, each response's ids, whether anything was
    cut, and whether a sequence was longer than max_len (what `data.overlong='drop'` drops)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False
    overlong: bool = False

    def sequences(self) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """(ids, target_mask) of prompt + chosen and of prompt + rejected."""
        mask = [0] * len(self.prompt)
        return ((self.prompt + self.chosen, mask + [1] * len(self.chosen)),
                (self.prompt + self.rejected, mask + [1] * len(self.rejected)))


def split_prompt(chosen: str | list, rejected: str | list) -> tuple[object, object, object]:
    """(prompt, chosen, rejected) from two whole texts or conversations: TRL's `extract_prompt`
    (their common beginning; for text, a space before the divergence goes to the responses)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx and chosen[idx - 1] == " ":
                idx -= 1
            break
    else:
        raise BadPair("chosen and rejected are the same" if chosen == rejected else
                      "one of chosen and rejected is the beginning of the other; there is no "
                      "response left to compare")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def parse(prompt: object, chosen: object, rejected: object) -> tuple[object, object, object]:
    """A row's three fields, checked: all texts, or all message lists (roles checked as chat
    rows are); `prompt` None means the implicit-prompt layout."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise BadPair(f"{name} is missing (a preference row needs prompt, chosen and "
                          "rejected)")
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return split_prompt(chosen, rejected)
        prompt, chosen, rejected = split_prompt(_messages(chosen, "chosen"),
                                                _messages(rejected, "rejected"))
        if not prompt:
            raise BadPair("chosen and rejected share no opening turns to serve as the prompt")
        return prompt, chosen, rejected
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if chosen == rejected:
            raise BadPair("chosen and rejected are the same")
        return prompt, chosen, rejected
    if any(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise BadPair("prompt, chosen and rejected must all be texts or all be message lists")
    prompt = _messages(prompt, "prompt")
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen == rejected:
        raise BadPair("chosen and rejected are the same")
    return prompt, chosen, rejected


def _messages(value: object, field: str) -> list[dict]:
    try:
        return chat.parse_messages(value)
    except chat.BadConversation as e:
        raise BadPair(f"{field}: {e}") from None


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: object, chosen: object,
             rejected: object, *, template: str | None) -> Pair:
    """TRL's tokens for one parsed pair (see the module docstring), before truncation."""
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [tokenizer(prompt + r + ("" if r.endswith(eos) else eos))["input_ids"]
                for r in (chosen, rejected)]
    else:
        if template is None:
            raise BadPair("conversational pairs need a chat template (data.chat_template)")

        def render(messages: list[dict], generation_prompt: bool = False) -> list[int]:
            try:
                return list(tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=True, return_dict=True,
                    add_generation_prompt=generation_prompt)["input_ids"])
            except Exception as e:  # noqa: BLE001 - templates raise anything
                raise BadPair(f"chat template failed: {first_line(e)}") from e

        prompt_ids = render(prompt, generation_prompt=True)
        full = [render(prompt + r) for r in (chosen, rejected)]
    start = min(_common_prefix(prompt_ids, f) for f in full)
    return Pair(list(prompt_ids[:start]), list(full[0][start:]), list(full[1][start:]))


def fit(pair: Pair, *, max_len: int, max_prompt_len: int) -> Pair:
    """The pair after the truncation rules (module docstring); `truncated` says if any cut."""
    prompt, cut = pair.prompt, False
    if max_prompt_len and len(prompt) > max_prompt_len:
        prompt, cut = prompt[len(prompt) - max_prompt_len:], True
    if not pair.chosen or not pair.rejected:
        raise BadPair("a response has no tokens")
    room = max_len - len(prompt)
    if room < 1:
        raise BadPair(f"the prompt is {len(prompt)} tokens, leaving no room for a response in "
                      f"data.max_len={max_len} (raise it, or set data.max_prompt_len)")
    chosen, rejected = pair.chosen[:room], pair.rejected[:room]
    overlong = len(chosen) < len(pair.chosen) or len(rejected) < len(pair.rejected)
    return Pair(prompt, chosen, rejected, cut or overlong, overlong)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
