"""A tokenizing worker: reads shard jobs on stdin, writes each shard's tokens to the cache.

    python -m jaxft.data.tokenize_worker SETTINGS.json    (started by `jaxft.data.worker_pool`)

One JSON line per job in ({"index", "shard", "key", "holdout"}), one per finished job out
({"index", "counts"} or {"index", "error", "kind"}); it exits when stdin closes, so a training
process that dies takes its workers with it. It imports numpy, pyarrow and `tokenizers` only,
never JAX or transformers, so it starts in a fraction of a second and holds little memory.

A document becomes prefix + tokens + EOS exactly as `jaxft.data.encode` makes a text example:
`tokenizers`' own encoding with the tokenizer's special tokens (the BOS a Llama tokenizer puts
before text), then EOS unless the tokenizer already ended with it.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

from jaxft.data import order, shards, token_cache

BATCH_DOCUMENTS = 512  # documents per encode_batch call: bounds the worker's memory


def tokenize(shard: shards.Shard, settings: dict, tokenizer, holdout: list | None,
             ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """The shard's train documents (and held-out ones under 'eval') as (tokens, offsets)."""
    texts, bad, first_bad = shards.read_documents(shard, text_column=settings["text_column"],
                                                  skip=settings["skip_bad_rows"])
    dtype = np.dtype(settings["dtype"])
    eos = settings["eos"]
    chunks, lengths = [], []
    for start in range(0, len(texts), BATCH_DOCUMENTS):
        encoded = tokenizer.encode_batch_fast(texts[start:start + BATCH_DOCUMENTS],
                                              add_special_tokens=True)
        for e in encoded:
            ids = e.ids
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            lengths.append(len(ids))
            chunks.append(ids)
    lengths = np.asarray(lengths, np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(chunks), dtype, count=int(lengths.sum()))
    del chunks, texts
    keep = np.arange(len(lengths))
    held = keep[:0]
    if holdout is not None:
        keep, held = order.holdout(len(lengths), holdout[0], holdout[1])
    parts = {"": _select(tokens, lengths, keep)}
    if len(held):
        parts["eval"] = _select(tokens, lengths, held)
    counts = {"documents": len(keep), "tokens": int(lengths[keep].sum()),
              "eval_documents": len(held), "eval_tokens": int(lengths[held].sum()),
              "skipped_bad_rows": bad, "first_bad": first_bad}
    return parts, counts


def _select(tokens: np.ndarray, lengths: np.ndarray, docs: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if len(docs) == len(lengths):
        return tokens, offsets
    picked = [tokens[offsets[d]:offsets[d + 1]] for d in docs]
    out = np.concatenate(picked) if picked else tokens[:0]
    return out, np.concatenate([[0], np.cumsum(lengths[docs])]).astype(np.int64)


def main(settings_path: str) -> None:
    from tokenizers import Tokenizer

    settings = json.loads(Path(settings_path).read_text())
    tokenizer = Tokenizer.from_file(settings["tokenizer"])
    directory = Path(settings["directory"])
    for line in sys.stdin:
        job = json.loads(line)
        reply = {"index": job["index"]}
        shard = shards.Shard(**{k: tuple(v) if k == "files" else v
                                for k, v in job["shard"].items()})
        try:
            parts, counts = tokenize(shard, settings, tokenizer, job["holdout"])
            token_cache.write_shard(directory, job["key"], parts, counts)
            reply["counts"] = counts
        except shards.BadShard as e:
            reply.update(error=str(e), kind="bad")
        except token_cache.NoRoom as e:
            reply.update(error=str(e), kind="room")
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which names the shard
            reply.update(error=f"{shard.describe()}: tokenizing failed ({type(e).__name__}: "
                               f"{e})", kind="crash")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per worker; the pool has many
    main(sys.argv[1])
