"""Lay examples out in fixed-length rows, and turn rows into the arrays the train step consumes.

The language-model batch contract, every array `[B, T]` with T = data.max_len:

| key              | dtype   | meaning                                                           |
|------------------|---------|-------------------------------------------------------------------|
| `input_ids`      | int32   | tokens; pad id in padding slots                                   |
| `targets`        | int32   | the next token of the same example; 0 where there is none         |
| `loss_mask`      | float32 | 1.0 exactly where `targets` is a trained token (0 on prompt tokens, |
|                  |         | padding and each example's last token)                            |
| `segment_ids`    | int32   | 1, 2, 3... for the examples packed in the row; 0 for padding      |
| `positions`      | int32   | 0, 1, 2... restarting at every example; 0 for padding             |
| `attention_mask` | int32   | segment_ids > 0                                                   |

The model must let a token attend only within its own segment (causal and
`segment_ids[q] == segment_ids[k]`), and use `positions` for RoPE / position embeddings.

Classification batches hold `input_ids`, `attention_mask`, `token_type_ids` `[B, T]` int32,
`labels` `[B]` int32 and `valid` `[B]` float32 (0 for the rows that pad the last eval batch);
one example per row.

Preference batches (task 'dpo') hold pairs: the language-model arrays as `[B, 2, T]`, index 0
prompt + chosen and 1 prompt + rejected of the same pair (one pair per row, never packed, so a
pair cannot split across devices), plus `valid` `[B]` (0 for the rows that pad the last eval
batch) and, once the reference pass has run, `ref_logps` `[B, 2]` float32.

Packing is first-fit over a window of the 64 most recently opened rows: each example goes into the
oldest open row with room for it, else opens a new row. It is deterministic in the visiting order,
never splits an example, and wastes little: a long example no longer strands the row before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxft import tasks
from jaxft.data.encode import Examples

OPEN_ROWS = 64  # how far back first-fit looks; more packs a little tighter but costs more time

LM_ARRAYS = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32,
             "segment_ids": np.int32, "positions": np.int32, "attention_mask": np.int32}


def batch_spec(task: str, batch_size: int, seq_len: int, *,
               ref_logps: bool = False, completion_len: int = 0, old_logps: bool = False
               ) -> dict[str, tuple[tuple[int, ...], type]]:
    """The batch contract above as data: {key: (shape, dtype)} of a batch of `batch_size` rows
    for `task`; `ref_logps`: preference pairs (or GRPO's completions) carry their reference's
    scores; GRPO's rows end in a completion of `completion_len` tokens (`jaxft.grpo`), and with
    `old_logps` carry the sampling policy's scores. What the loader (or GRPO's
    rollout) fills and what the dry run compiles the step for."""
    rows, per_row = (batch_size, seq_len), (batch_size,)
    if task == tasks.GRPO:
        return {"input_ids": (rows, np.int32), "segment_ids": (rows, np.int32),
                "positions": (rows, np.int32),
                "completion_mask": ((batch_size, completion_len), np.int32),
                "advantages": (per_row, np.float32),
                **({"ref_logps": ((batch_size, completion_len), np.float32)} if ref_logps
                   else {}),
                **({"old_logps": ((batch_size, completion_len), np.float32)} if old_logps
                   else {})}
    if task == tasks.DPO:
        pairs = {k: ((batch_size, 2, seq_len), dtype) for k, dtype in LM_ARRAYS.items()}
        return {**pairs, "valid": (per_row, np.float32),
                **({"ref_logps": ((batch_size, 2), np.float32)} if ref_logps else {})}
    if task == tasks.CLASSIFICATION:
        return {"input_ids": (rows, np.int32), "attention_mask": (rows, np.int32),
                "token_type_ids": (rows, np.int32), "labels": (per_row, np.int32),
                "valid": (per_row, np.float32)}
    return {k: (rows, dtype) for k, dtype in LM_ARRAYS.items()}


def _empty(task: str, batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of the contract's arrays, all padding (`pad_id` tokens, zeros elsewhere)."""
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
           batch_spec(task, batch_size, seq_len).items()}
    out["input_ids"][...] = pad_id
    return out


def plan_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int,
              packing: bool) -> list[list[int]]:
    """Example indices for each row, visiting examples in `order`; one per row without packing."""
    if not packing:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    open_rows: list[int] = []  # indices into `rows` that may still take examples, oldest first
    room: list[int] = []  # free slots of each open row
    for i in order:
        n = int(lengths[i])
        k = next((k for k, r in enumerate(room) if r >= n), None)
        if k is None:
            rows.append([int(i)])
            open_rows.append(len(rows) - 1)
            room.append(seq_len - n)
            if len(open_rows) > OPEN_ROWS:
                del open_rows[0], room[0]
            continue
        rows[open_rows[k]].append(int(i))
        room[k] -= n
        if room[k] == 0:
            del open_rows[k], room[k]
    return rows


def efficiency(lengths: np.ndarray, n_rows: int, seq_len: int) -> float:
    """Real tokens / token slots over a set of rows."""
    return float(lengths.sum()) / float(max(1, n_rows) * seq_len)


def lm_batch(ex: Examples, rows: Sequence[Sequence[int]], seq_len: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """The language-model arrays for `rows` (an empty row is all padding)."""
    out = _empty(tasks.LM, len(rows), seq_len, pad_id)
    input_ids, targets, loss_mask, segment_ids, positions = (
        out[k] for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"))
    for r, row in enumerate(rows):
        col = 0
        for segment, i in enumerate(row, 1):
            a, b = ex.offsets[i], ex.offsets[i + 1]
            n = b - a
            input_ids[r, col:col + n] = ex.tokens[a:b]
            targets[r, col:col + n - 1] = ex.tokens[a + 1:b]  # shifted within the example only
            loss_mask[r, col:col + n - 1] = ex.target_mask[a + 1:b]
            segment_ids[r, col:col + n] = segment
            positions[r, col:col + n] = np.arange(n)
            col += n
    out["attention_mask"][...] = segment_ids > 0
    return out


def classification_batch(ex: Examples, rows: Sequence[Sequence[int]], seq_len: int,
                         pad_id: int) -> dict[str, np.ndarray]:
    """The classification arrays for `rows`, each holding one example (or none: padding)."""
    out = _empty(tasks.CLASSIFICATION, len(rows), seq_len, pad_id)
    input_ids, attention_mask, token_type_ids, labels, valid = (
        out[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "valid"))
    for r, row in enumerate(rows):
        if not row:
            continue
        (i,) = row
        a, b = ex.offsets[i], ex.offsets[i + 1]
        input_ids[r, : b - a] = ex.tokens[a:b]
        attention_mask[r, : b - a] = 1
        token_type_ids[r, : b - a] = ex.token_types[a:b]
        labels[r] = ex.labels[i]
        valid[r] = 1.0
    return out


def pair_batch(ex: Examples, rows: Sequence[Sequence[int]], seq_len: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """The preference arrays for `rows`, each holding one pair index p (examples 2p, 2p + 1)
    or none (padding)."""
    flat: list[list[int]] = []
    for row in rows:
        flat.extend([[2 * row[0]], [2 * row[0] + 1]] if row else [[], []])
    out = {k: v.reshape(len(rows), 2, seq_len)
           for k, v in lm_batch(ex, flat, seq_len, pad_id).items()}
    out["valid"] = np.array([1.0 if row else 0.0 for row in rows], np.float32)
    if ex.ref_logps is not None:
        out["ref_logps"] = np.stack([ex.ref_logps[row[0]] if row else np.zeros(2, np.float32)
                                     for row in rows])
    return out
