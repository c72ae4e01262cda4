"""Render conversations with the model's chat template and find the assistant text inside them.

The loss belongs on what the assistant says, so for each assistant turn i we render

    before = template(messages[:i], add_generation_prompt=True)   # ends with the assistant header
    through = template(messages[:i + 1])                          # ends after the turn's end marker

and the turn is the characters `[len(before), len(through))` of the full rendering (trailing
whitespace after the end marker excluded). This needs nothing from the template beyond rendering
prefixes consistently, unlike `return_assistant_tokens_mask`, which needs `{% generation %}` tags
that few templates have. A template that renders prefixes differently (one that rewrites earlier
turns, say) is caught by checking that each rendering extends the previous one.

The rendered text is then tokenized piece by piece at those character boundaries, so a token
never straddles prompt and answer and the mask is exact. Each piece is tokenized without added
special tokens: the template already wrote BOS/headers into the text.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from jaxft.errors import JaxftError, first_line

# ChatML as Qwen and SmolLM use it, for tokenizers that ship without a template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}
# The roles chat templates know (OpenAI's, as transformers' templates and TRL use them, plus
# Llama 3's `ipython` tool role). Any other is refused: most templates would render a misspelt
# role as plain text and train on it silently, or drop the turn.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


class BadConversation(ValueError):
    """One row's conversation cannot be used; the caller adds the row's location."""


def resolve_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    """The Jinja template to render with: the config's choice, else the tokenizer's own."""
    if chat_template:
        if chat_template in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        raise JaxftError(f"data.chat_template must be one of {sorted(NAMED_TEMPLATES)} or a Jinja "
                         f"template, got {chat_template!r}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: 'default' is the one chats use
        own = own.get("default")
    if not own:
        raise JaxftError(f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no "
                         "chat template; set data.chat_template='chatml' (or a Jinja template)")
    return own


def parse_messages(value: object) -> list[dict]:
    """A conversation as a list of {role, content, ...} dicts with string role and content.

    Keys that are None are dropped: Arrow gives every message the union of all messages' keys,
    and templates test `message.tool_calls is defined`, not `is not none`. A JSON string (a CSV
    cell) is parsed first.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadConversation(f"messages is a string but not JSON ({e.msg})") from e
    if not isinstance(value, list) or not value:
        raise BadConversation("messages must be a non-empty list of {role, content} objects")
    messages = []
    for j, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise BadConversation(f"message {j} is not an object")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadConversation(f"message {j} needs string 'role' and 'content', has "
                                  f"{sorted(m)}")
        if m["role"] not in ROLES:
            raise BadConversation(f"message {j} has role {m['role']!r}, expected one of "
                                  f"{', '.join(ROLES)}")
        messages.append(m)
    return messages


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    try:
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise BadConversation("conversation starts with an assistant turn; the loss needs "
                                      "a user turn before it")
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise BadConversation(f"the chat template renders turn {i + 1} differently as a "
                                      "prefix; set data.chat_template to a prefix-stable template")
            spans.append((len(before), max(len(before), len(through.rstrip()))))
    except BadConversation:
        raise
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception)
        raise BadConversation(f"chat template failed: {first_line(e)}") from e
    if not spans:
        raise BadConversation("conversation has no assistant turn to train on")
    return full, spans


def split_at_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """`text` cut into consecutive (piece, is_assistant) parts at the span boundaries."""
    pieces, cursor = [], 0
    for start, end in spans:
        if start > cursor:
            pieces.append((text[cursor:start], False))
        if end > start:
            pieces.append((text[start:end], True))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], False))
    return pieces
