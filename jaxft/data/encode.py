"""Tokenize rows into examples: token ids plus a mask of which tokens the loss is taken on.

An example is a token sequence and a `target_mask` of the same length: `target_mask[j] = 1` when
token j is to be learned, i.e. predicted from tokens 0..j-1 of the same example. Token 0 never is
(nothing precedes it). Batching later shifts this into the train step's `targets`/`loss_mask`.

Per format (see `formats.py`):
- text: BOS-style prefix the tokenizer adds + text + EOS, all trained. A document longer than
  max_len is cut into max_len pieces that overlap by one token, so every next-token pair is
  trained exactly once and no document is ever truncated.
- prompt/completion: prefix + prompt + completion + EOS; completion and EOS trained. Prompt and
  completion are tokenized separately, so no token straddles the boundary.
- messages: see `chat.py`; the assistant turns (through their end-of-turn marker) are trained.
- classification: the tokenizer's own [CLS] a [SEP] b [SEP] encoding plus a class id (0 for
  rows to predict, which have no label column).
- preference: see `preference.py`; each pair becomes two consecutive examples, prompt + chosen
  then prompt + rejected, their responses trained. Counts are of pairs.

Rows run through one batched `datasets.map` (cached on disk for file-backed datasets). Each row
gets a status, so that truncated, dropped and malformed rows are counted rather than vanishing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from jaxft.data import chat, formats, labels, preference
from jaxft.data.files import LOCATION_COLUMNS, Loaded
from jaxft.data.formats import Schema
from jaxft.errors import JaxftError

OK, TRUNCATED, DROPPED_OVERLONG, NO_TARGET, BAD_ROW = range(5)


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples stored flat: example i is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray  # int32 [N], all examples concatenated
    target_mask: np.ndarray  # uint8 [N], 1 where the token is learned
    offsets: np.ndarray  # int64 [E + 1]
    labels: np.ndarray | None = None  # int32 [E], classification only
    token_types: np.ndarray | None = None  # int32 [N], classification only
    ref_logps: np.ndarray | None = None  # float32 [E / 2, 2], preference pairs once scored

    @property
    def pairs(self) -> int:
        """Preference pairs held (examples 2p and 2p + 1 are pair p's chosen and rejected)."""
        return len(self) // 2

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode(loaded: Loaded, schema: Schema, tokenizer: PreTrainedTokenizerBase,
           cfg: ml_collections.ConfigDict, *,
           label_map: dict[str, int] | None = None) -> tuple[Examples, dict[str, int]]:
    """Examples for every usable row of `loaded`, and counts of what happened to the others."""
    if cfg.overlong not in ("truncate", "drop"):
        raise JaxftError(f"data.overlong must be 'truncate' or 'drop', got {cfg.overlong!r}")
    if cfg.max_len < 2:
        raise JaxftError(f"data.max_len must be at least 2, got {cfg.max_len}")
    encoder = _Encoder(tokenizer, schema, loaded, max_len=cfg.max_len, overlong=cfg.overlong,
                       skip_bad_rows=cfg.skip_bad_rows, label_map=label_map,
                       template=chat_template_for(tokenizer, schema, loaded, cfg),
                       max_prompt_len=cfg.max_prompt_len)
    rows = loaded.rows
    mapped = rows.map(encoder, batched=True, batch_size=256, remove_columns=rows.column_names,
                      desc=f"Tokenizing {loaded.origin}")
    table = mapped.with_format("arrow")[:]
    status = table.column("status").to_numpy()
    per_example = status[::2] if schema.format == "preference" else status  # a pair: two rows
    counts = (np.bincount(per_example, minlength=5) if len(per_example) else
              np.zeros(5, np.int64))
    stats = {"rows": len(rows), "examples": int(counts[OK] + counts[TRUNCATED]),
             "truncated": int(counts[TRUNCATED]), "dropped_overlong": int(counts[DROPPED_OVERLONG]),
             "dropped_no_target": int(counts[NO_TARGET]),
             "skipped_bad_rows": int(counts[BAD_ROW]) + loaded.bad_rows}
    if stats["examples"] == 0:
        raise JaxftError(_nothing_left(str(loaded.origin), stats, cfg))
    examples = _to_examples(table.filter(pa.array(status <= TRUNCATED)), schema.format)
    stats["tokens"] = int(len(examples.tokens))
    stats["target_tokens"] = int(examples.target_mask.sum())
    return examples, stats


def _nothing_left(where: str, stats: dict[str, int], cfg: ml_collections.ConfigDict) -> str:
    if stats["rows"] == 0:
        return f"{where}: no rows (the dataset is empty)"
    if stats["dropped_overlong"]:
        return (f"{where}: all {stats['dropped_overlong']} usable examples are longer than "
                f"max_len={cfg.max_len} and data.overlong='drop' removed them; raise data.max_len "
                "or set data.overlong='truncate'")
    return (f"{where}: no usable examples ({stats['skipped_bad_rows']} malformed rows skipped, "
            f"{stats['dropped_no_target']} with no tokens to train on after truncation)")


def chat_template_for(tokenizer: PreTrainedTokenizerBase, schema: Schema, loaded: Loaded,
              cfg: ml_collections.ConfigDict) -> str | None:
    """The chat template conversations render with (messages, conversational pairs); None for
    data without conversations."""
    if schema.format == "messages":
        return chat.resolve_template(tokenizer, cfg.chat_template)
    if schema.format == "preference" and len(loaded.rows):
        first = loaded.rows[0][schema.columns["chosen"]]
        if not isinstance(first, str):
            return chat.resolve_template(tokenizer, cfg.chat_template)
    return None


def _to_examples(table: pa.Table, fmt: str) -> Examples:
    def flat(name: str, dtype) -> np.ndarray:
        return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False).astype(dtype)

    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = flat("input_ids", np.int32)
    if fmt == "classification":
        return Examples(tokens, np.zeros(len(tokens), np.uint8), offsets,
                        labels=table.column("label").to_numpy().astype(np.int32),
                        token_types=flat("token_type_ids", np.int32))
    return Examples(tokens, flat("target_mask", np.uint8), offsets)


class _Encoder:
    """The batched map function. A class so `datasets` can hash it for its cache.

    One generator per format yields a tuple per output row ending in its status:
    (ids, target_mask, status) for language modelling, (ids, token_types, label, status) for
    classification. Unusable rows still yield (empty) so that they are counted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, schema: Schema, loaded: Loaded, *,
                 max_len: int, overlong: str, skip_bad_rows: bool,
                 label_map: dict[str, int] | None, template: str | None,
                 max_prompt_len: int = 0):
        self.tok, self.schema, self.origin = tokenizer, schema, loaded.origin
        self.max_prompt_len = max_prompt_len
        self.max_len, self.overlong, self.skip = max_len, overlong, skip_bad_rows
        self.label_map = label_map
        self.label_ids = frozenset(label_map.values()) if label_map else frozenset()
        self.template = template
        probe_with = tokenizer("a", add_special_tokens=True)["input_ids"]
        probe = tokenizer("a", add_special_tokens=False)["input_ids"]
        cut = _find(probe_with, probe)  # what the tokenizer puts before text, e.g. BOS
        self.prefix = list(probe_with[:cut]) if cut is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        where = list(zip(*(batch[c] for c in LOCATION_COLUMNS), strict=True))
        rows = list(getattr(self, "_" + self.schema.format)(batch, where))
        names = (("input_ids", "token_type_ids", "label", "status")
                 if self.schema.format == "classification"
                 else ("input_ids", "target_mask", "status"))
        return {name: [r[k] for r in rows] for k, name in enumerate(names)}

    # -- one generator per format ----------------------------------------------------------

    def _text(self, batch: dict[str, list], where: list) -> Iterator[tuple]:
        texts = [self._usable(t, w, isinstance(t, str), "text is not a string")
                 for t, w in zip(batch[self.schema.columns["text"]], where, strict=True)]
        encoded = self.tok([t or "" for t in texts], add_special_tokens=True)["input_ids"]
        for text, ids in zip(texts, encoded, strict=True):
            if text is None:
                yield [], [], BAD_ROW
                continue
            if self.eos and (not ids or ids[-1] != self.eos[0]):
                ids = list(ids) + self.eos
            for start in range(0, max(1, len(ids) - 1), self.max_len - 1):  # overlap by one
                piece = list(ids[start:start + self.max_len])
                yield piece, [0] + [1] * (len(piece) - 1), OK if len(piece) > 1 else NO_TARGET

    def _prompt_completion(self, batch: dict[str, list], where: list) -> Iterator[tuple]:
        cols = self.schema.columns
        if self.schema.alpaca:
            contexts = batch.get("input", [None] * len(where))
            prompts = [formats.alpaca_prompt(i, c) if isinstance(i, str) else None
                       for i, c in zip(batch[cols["instruction"]], contexts, strict=True)]
            completions = batch[cols["output"]]
        else:
            prompts, completions = batch[cols["prompt"]], batch[cols["completion"]]
        pairs = [self._usable((p, c), w, isinstance(p, str) and isinstance(c, str),
                              "prompt and completion must both be strings")
                 for p, c, w in zip(prompts, completions, where, strict=True)]
        p_ids = self.tok([p[0] if p else "" for p in pairs], add_special_tokens=False)
        c_ids = self.tok([p[1] if p else "" for p in pairs], add_special_tokens=False)
        for pair, p, c in zip(pairs, p_ids["input_ids"], c_ids["input_ids"], strict=True):
            if pair is None:
                yield [], [], BAD_ROW
                continue
            head, tail = self.prefix + list(p), list(c) + self.eos
            yield self._fit(head + tail, [0] * len(head) + [1] * len(tail))

    def _messages(self, batch: dict[str, list], where: list) -> Iterator[tuple]:
        rows = []  # per row: its (text, is_assistant) pieces, or None when unusable
        for value, w in zip(batch[self.schema.columns["messages"]], where, strict=True):
            try:
                messages = chat.parse_messages(value)
                rows.append(chat.split_at_spans(
                    *chat.assistant_spans(self.tok, messages, self.template)))
            except chat.BadConversation as e:
                rows.append(self._usable(None, w, False, str(e)))
        texts = [text for pieces in rows if pieces for text, _ in pieces]
        encoded = iter(self.tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for pieces in rows:
            if pieces is None:
                yield [], [], BAD_ROW
                continue
            ids: list[int] = []
            mask: list[int] = []
            for _, is_assistant in pieces:
                piece_ids = next(encoded)
                ids.extend(piece_ids)
                mask.extend([int(is_assistant)] * len(piece_ids))
            yield self._fit(ids, mask)

    def _preference(self, batch: dict[str, list], where: list) -> Iterator[tuple]:
        cols = self.schema.columns
        prompts = batch[cols["prompt"]] if "prompt" in cols else [None] * len(where)
        for p, c, r, w in zip(prompts, batch[cols["chosen"]], batch[cols["rejected"]], where,
                              strict=True):
            try:
                pair = preference.tokenize(self.tok, *preference.parse(p, c, r),
                                           template=self.template)
                fitted = preference.fit(pair, max_len=self.max_len,
                                        max_prompt_len=self.max_prompt_len)
            except preference.BadPair as e:
                self._usable(None, w, False, str(e))
                yield from (([], [], BAD_ROW), ([], [], BAD_ROW))
                continue
            status = TRUNCATED if fitted.truncated else OK
            if fitted.overlong and self.overlong == "drop":
                yield from (([], [], DROPPED_OVERLONG), ([], [], DROPPED_OVERLONG))
                continue
            for ids, mask in fitted.sequences():
                yield ids, mask, status

    def _classification(self, batch: dict[str, list], where: list) -> Iterator[tuple]:
        cols = self.schema.columns
        texts = batch[cols["text"]]
        seconds = batch[cols["text_pair"]] if "text_pair" in cols else [None] * len(texts)
        # Rows to predict have no label column: they get class 0, which nothing reads.
        given = batch[cols["label"]] if "label" in cols else [None] * len(texts)
        rows = []  # per row: (text, text pair, class id), or None when unusable
        for t, t2, label, w in zip(texts, seconds, given, where, strict=True):
            try:
                if not isinstance(t, str) or not isinstance(t2, (str, type(None))):
                    raise ValueError("text is not a string")
                rows.append((t, t2, labels.label_id(label, self.label_map, self.label_ids)
                             if "label" in cols else 0))
            except ValueError as e:
                rows.append(self._usable(None, w, False, str(e)))
        good = [r for r in rows if r]
        pair_texts = [r[1] for r in good] if "text_pair" in cols else None
        enc = self.tok([r[0] for r in good], pair_texts, return_token_type_ids=True)
        k = 0
        for row in rows:
            if row is None:
                yield [], [], -1, BAD_ROW
                continue
            ids, types, status = enc["input_ids"][k], enc["token_type_ids"][k], OK
            k += 1
            if len(ids) > self.max_len and self.overlong == "drop":
                ids, types, status = [], [], DROPPED_OVERLONG
            elif len(ids) > self.max_len:  # re-encode so the closing [SEP] survives truncation
                one = self.tok(row[0], row[1], truncation=True, max_length=self.max_len,
                               return_token_type_ids=True)
                ids, types, status = one["input_ids"], one["token_type_ids"], TRUNCATED
            yield ids, types, row[2], status

    # -- helpers ------------------------------------------------------------------------------

    def _usable(self, value, where: tuple[int, int], ok: bool, problem: str):
        """`value` if ok; else None with skip_bad_rows, or a JaxftError naming the row."""
        if ok:
            return value
        if not self.skip:
            raise JaxftError(f"{self.origin.where(*where)}: {problem}")
        return None

    def _fit(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int], int]:
        """Apply data.overlong to a language-model example, and reject one with nothing to learn."""
        status = OK
        if len(ids) > self.max_len:
            if self.overlong == "drop":
                return [], [], DROPPED_OVERLONG
            ids, mask, status = ids[: self.max_len], mask[: self.max_len], TRUNCATED
        return ids, mask, status if any(mask[1:]) else NO_TARGET


def _find(haystack: list[int], needle: list[int]) -> int | None:
    """Index of the first occurrence of `needle` in `haystack`."""
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return None

