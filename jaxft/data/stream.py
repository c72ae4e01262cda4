"""A raw-text corpus of any size, trained on while it is still being tokenized (data.streaming).

    corpus = StreamedCorpus.open(path, cfg, tokenizer, holdout=(0.1, 0), process_index=0,
                                 process_count=1)         # plans shards, starts the workers
    train = StreamIterator(corpus, seq_len=2048, global_batch_size=32, seed=0, pad_id=0,
                           process_index=0, process_count=1)
    batch = next(train)                                   # as soon as its shard is tokenized

The corpus is cut into shards (`shards.py`), tokenized by `data.num_workers` worker processes
into a cache on disk (`token_cache.py`, reused by later runs and resumes) and read back memory-
mapped, one shard at a time, so host memory holds one shard's rows however large the corpus.

The order is a pure function of the seed and the shard list, never of which worker finished
first: epoch e reads this process's shards in `order.shard_order(shards, seed, e)`; inside a
shard, documents are cut into max_len pieces that overlap by one token (as the in-memory text
format cuts them) and packed first-fit in `order.epoch_order` of the pieces, never across a
shard's end. A position in that stream is (epoch, shard, row), so resuming is exact: the state
is a few integers, and the shard it points into is re-read from the cache (or re-tokenized,
to the same tokens). Workers tokenize shards in the order training reads them; a batch whose
shard is not finished waits for it.

Eval documents are held out of the first shard (file order), `data.eval_fraction` of its
documents by a seeded hash: the eval set is ready with that shard and does not grow with the
corpus. `data.eval_path` names a separate corpus instead (every one of its shards is eval).

With several processes, shard i belongs to process i mod P: each tokenizes and reads only its
own shards and packs its own rows, P local batches making a global one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import ml_collections
import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxft.data import order, packing, shards, token_cache
from jaxft.data.encode import Examples
from jaxft.data.iterator import Batch, local_batch_size
from jaxft.data.worker_pool import WorkerPool
from jaxft.errors import JaxftError
from jaxft.hf import hub

log = logging.getLogger(__name__)
STATE_KEYS = ("epoch", "shard", "row", "step", "shards")


def workers_wanted(requested: int) -> int:
    """data.num_workers, or every core this process may use when it is 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass
class StreamedCorpus:
    """The shards of one corpus, their cache entries, and the workers filling the cache."""

    origin: str
    shards: list[shards.Shard]
    keys: list[str]
    directory: Path
    holdout_shard: int | None  # the shard eval documents are held out of
    mine: list[int]  # this process's shards
    pool: WorkerPool | None
    settings_path: Path | None = None  # what the workers read at start; removed at close
    counts: dict[int, dict] = dataclasses.field(default_factory=dict)
    skip_bad_rows: bool = False
    cached: int = 0  # shards found already tokenized when the run started

    @classmethod
    def open(cls, path: str, cfg: ml_collections.ConfigDict,
             tokenizer: PreTrainedTokenizerBase, *, holdout: tuple[float, int] | None,
             process_index: int, process_count: int, all_are_mine: bool = False,
             eval_only: bool = False) -> StreamedCorpus:
        """Plan `path`'s shards, find those already cached and start tokenizing the others (this
        process's, in the order training reads them; the hold-out shard first). `eval_only`:
        the hold-out shard alone (or, with no hold-out, every shard: an eval corpus)."""
        if cfg.shard_mb <= 0:
            raise JaxftError(f"data.shard_mb must be positive, got {cfg.shard_mb}")
        if path.startswith(hub.PACKAGE_PREFIX):  # a corpus shipped inside a package
            path = str(hub.packaged_path(path))
        planned = (shards.plan_shards(path, shard_bytes=int(cfg.shard_mb * (1 << 20)),
                                      document=cfg.txt_document) if hub.looks_local(path)
                   else shards.hub_shards(path))
        if not all_are_mine and len(planned) < process_count:
            raise JaxftError(f"{path}: {len(planned)} shards for {process_count} processes; "
                             "lower data.shard_mb so that every process has one")
        directory, settings = _settings(cfg, tokenizer)
        keys = shard_keys(planned, holdout)
        mine = (list(range(len(planned))) if all_are_mine else
                list(range(process_index, len(planned), process_count)))
        corpus = cls(path, planned, keys, directory, 0 if holdout is not None else None, mine,
                     None, settings, skip_bad_rows=bool(cfg.skip_bad_rows))
        need = ([0] if holdout is not None else []) + [
            mine[i] for i in order.shard_order(len(mine), cfg.seed, 0) if mine[i] != 0
            or holdout is None]
        if eval_only and holdout is not None:
            need = [0]
        jobs = []
        for i in need:
            found = token_cache.read_counts(directory, keys[i])
            if found is not None:
                corpus.counts[i] = found
                continue
            jobs.append({"index": i, "shard": dataclasses.asdict(planned[i]), "key": keys[i],
                         "holdout": list(holdout) if holdout is not None and i == 0 else None})
        corpus.cached = len(need) - len(jobs)
        if jobs:
            corpus.pool = WorkerPool(str(settings), workers_wanted(cfg.num_workers), jobs)
        else:  # nothing to tokenize: no worker will read the settings
            corpus.close()
        log.info("data: %s: %d shards, %d cached, %d to tokenize in %s", path, len(planned),
                 len(need) - len(jobs), len(jobs), directory)
        return corpus

    @property
    def to_tokenize(self) -> int:
        """Shards of this process still being tokenized."""
        return 0 if self.pool is None else self.pool.pending()

    def shard_counts(self, index: int) -> dict:
        """Shard `index`'s counts, waiting for its tokens; a shard that cannot be read stops
        the run naming it, or with data.skip_bad_rows is counted and read as empty."""
        if index not in self.counts:
            if self.pool is None:
                raise JaxftError(f"shard {index} of {self.origin} is not tokenized")
            reply = self.pool.wait(index)
            if "error" in reply:
                if reply["kind"] == "bad" and self.skip_bad_rows:
                    log.warning("data: skipped an unreadable shard: %s", reply["error"])
                    reply = {"counts": {"documents": 0, "tokens": 0, "skipped_bad_rows": 0,
                                        "unreadable": reply["error"]}}
                else:
                    self.close()
                    raise JaxftError(reply["error"])
            self.counts[index] = reply["counts"]
        return self.counts[index]

    def documents(self, index: int, part: str = "") -> token_cache.ShardTokens | None:
        """Shard `index`'s documents (memory-mapped), or None when it has none."""
        counts = self.shard_counts(index)
        if not counts.get("eval_documents" if part else "documents"):
            return None
        return token_cache.open_shard(self.directory, self.keys[index], part)

    def close(self) -> None:
        """End the workers (shards in progress are abandoned, never half-read later)."""
        if self.pool is not None:
            self.pool.close()
        if self.settings_path is not None:
            self.settings_path.unlink(missing_ok=True)

    def totals(self) -> dict[str, int]:
        """Counts summed over this process's shards, waiting for all of them."""
        out: dict[str, int] = {}
        for i in self.mine:
            for k, v in self.shard_counts(i).items():
                if isinstance(v, int):
                    out[k] = out.get(k, 0) + v
            if "unreadable" in self.counts[i]:
                out["unreadable_shards"] = out.get("unreadable_shards", 0) + 1
        return out


def shard_keys(planned: list[shards.Shard], holdout: tuple[float, int] | None) -> list[str]:
    """Each shard's cache key: its files and range, and for the first, the eval hold-out."""
    keys = []
    for i, shard in enumerate(planned):
        identity = {"shard": shard.identity()}
        if holdout is not None and i == 0:
            identity["holdout"] = list(holdout)
        keys.append(token_cache.key(identity))
    return keys


def _settings(cfg: ml_collections.ConfigDict,
              tokenizer: PreTrainedTokenizerBase) -> tuple[Path, Path]:
    """The cache directory for these settings, with the tokenizer and the worker settings
    written into it; (directory, path of the settings file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise JaxftError("data.streaming needs a fast (tokenizers) tokenizer; this one is "
                         f"{type(tokenizer).__name__}")
    tokenizer_json = backend.to_str()
    vocab = backend.get_vocab_size(with_added_tokens=True)
    settings = {"version": token_cache.VERSION, "tokenizer": token_cache.key(tokenizer_json),
                "text_column": cfg.text_column, "document": cfg.txt_document,
                "eos": tokenizer.eos_token_id,
                "dtype": "uint16" if vocab <= 1 << 16 else "uint32"}
    root = Path(cfg.cache_dir) if cfg.cache_dir else token_cache.default_dir()
    directory = root / token_cache.key(settings)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        token_cache.write_atomic(directory / "tokenizer.json", tokenizer_json.encode())
        worker = {**settings, "tokenizer": str(directory / "tokenizer.json"),
                  "directory": str(directory), "skip_bad_rows": bool(cfg.skip_bad_rows)}
        path = directory / f"settings.{os.getpid()}.json"
        token_cache.write_atomic(path, json.dumps(worker).encode())
    except OSError as e:
        raise JaxftError(f"data.cache_dir {root}: cannot write the tokenized corpus there "
                         f"({os.strerror(e.errno) if e.errno else e})") from e
    return directory, path


def pieces(docs: token_cache.ShardTokens, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every example cut from the documents: max_len pieces overlapping by
    one token, so each next-token pair is trained once; one-token documents give none."""
    lengths = docs.lengths.astype(np.int64)
    lengths = np.where(lengths >= 2, lengths, 1)
    per_doc = np.where(docs.lengths >= 2, -(-(lengths - 1) // (max_len - 1)), 0)
    doc = np.repeat(np.arange(len(lengths)), per_doc)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    into = k * (max_len - 1)
    return (np.asarray(docs.offsets[:-1], np.int64)[doc] + into,
            np.minimum(max_len, lengths[doc] - into))


def gather(rows: list[list[tuple[np.ndarray, int, int]]]) -> tuple[Examples, list[list[int]]]:
    """A batch's rows of (tokens, start, length) pieces as Examples plus rows of indices into
    them, for `packing.lm_batch`: only the batch's own tokens are copied out of the cache."""
    spans = [piece for row in rows for piece in row]
    tokens = (np.concatenate([t[a:a + n] for t, a, n in spans]).astype(np.int32) if spans
              else np.zeros(0, np.int32))
    lengths = np.array([n for _, _, n in spans], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    mask = np.ones(len(tokens), np.uint8)
    indices, k = [], 0
    for row in rows:
        indices.append(list(range(k, k + len(row))))
        k += len(row)
    return Examples(tokens, mask, offsets), indices


class StreamIterator:
    """This process's slice of each global batch, read from the streamed corpus in a fixed
    order. `get_state()` / `set_state()` as `TrainIterator`'s: resuming is exact."""

    packing = True
    pairs = False
    classification = False

    def __init__(self, corpus: StreamedCorpus, *, seq_len: int, global_batch_size: int,
                 seed: int, pad_id: int, process_index: int, process_count: int):
        self.corpus, self.seq_len, self.seed, self.pad_id = corpus, seq_len, seed, pad_id
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size(global_batch_size, process_index,
                                                 process_count)
        self.process_index, self.process_count = process_index, process_count
        self._epoch = self._shard = self._row = self._step = 0
        self._current: tuple[tuple[int, int], list[list[tuple]]] | None = None

    def shard_sequence(self, epoch: int) -> list[int]:
        """The shard indices epoch `epoch` reads, in order (this process's shards)."""
        mine = self.corpus.mine
        return [mine[i] for i in order.shard_order(len(mine), self.seed, epoch)]

    def shard_rows(self, epoch: int, shard: int) -> list[list[tuple[np.ndarray, int, int]]]:
        """The rows `shard` packs into in `epoch`: lists of (tokens, start, length) pieces."""
        docs = self.corpus.documents(shard)
        if docs is None:
            return []
        starts, lengths = pieces(docs, self.seq_len)
        visit = order.epoch_order(len(starts), self.seed,
                                  epoch * len(self.corpus.shards) + shard)
        planned = packing.plan_rows(lengths, visit, self.seq_len, packing=True)
        tokens = docs.tokens
        return [[(tokens, int(starts[i]), int(lengths[i])) for i in row] for row in planned]

    def _rows_here(self) -> list[list[tuple]]:
        where = (self._epoch, self._shard)
        if self._current is None or self._current[0] != where:
            shard = self.shard_sequence(self._epoch)[self._shard]
            self._current = (where, self.shard_rows(self._epoch, shard))
        return self._current[1]

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> Batch:
        taken: list[list[tuple]] = []
        empty_run = 0
        while len(taken) < self.local_batch_size:
            rows = self._rows_here()
            chunk = rows[self._row:self._row + self.local_batch_size - len(taken)]
            taken.extend(chunk)
            self._row += len(chunk)
            empty_run = 0 if rows else empty_run + 1
            if empty_run > len(self.corpus.mine):
                raise JaxftError(f"{self.corpus.origin}: no shard of this process holds a "
                                 "document to train on")
            if self._row >= len(rows):
                self._shard, self._row = self._shard + 1, 0
                if self._shard >= len(self.corpus.mine):
                    self._epoch, self._shard = self._epoch + 1, 0
        self._step += 1
        examples, indices = gather(taken)
        return packing.lm_batch(examples, indices, self.seq_len, self.pad_id)

    @property
    def epoch(self) -> int:
        return self._epoch

    def rows_per_epoch(self) -> int:
        """Rows of epoch 0 over every process (waits for the whole corpus to be tokenized)."""
        mine = sum(len(self.shard_rows(0, s)) for s in self.shard_sequence(0))
        return mine * self.process_count

    def get_state(self) -> dict:
        """Where this process's stream stands; with several processes, every process's (a
        collective: each one's position differs, as its shards do)."""
        here = [self._epoch, self._shard, self._row, self._step]
        state: dict = {"shards": len(self.corpus.shards)}
        if self.process_count == 1:
            return {**dict(zip(STATE_KEYS[:4], here, strict=True)), **state}
        from jax.experimental import multihost_utils

        every = multihost_utils.process_allgather(np.asarray(here, np.int64))
        return {**state, "processes": np.asarray(every).reshape(-1, 4).tolist()}

    def set_state(self, state: dict) -> None:
        if "shards" not in state:
            raise JaxftError("the checkpoint's data state is not a streamed corpus's "
                             "(data.streaming was off when it was saved); it cannot resume "
                             "exactly")
        if int(state["shards"]) != len(self.corpus.shards):
            raise JaxftError(f"data iterator state was saved for {state.get('shards')} shards of "
                             f"a streamed corpus, which now has {len(self.corpus.shards)}; it "
                             "cannot resume exactly")
        if "processes" in state:
            if len(state["processes"]) != self.process_count:
                raise JaxftError(f"data iterator state was saved by {len(state['processes'])} "
                                 f"processes, not {self.process_count}")
            values = state["processes"][self.process_index]
        else:
            missing = [k for k in STATE_KEYS if k not in state]
            if missing:
                raise JaxftError(f"data iterator state lacks {missing} (a streamed corpus "
                                 f"expects {STATE_KEYS})")
            values = [state[k] for k in STATE_KEYS[:4]]
        self._epoch, self._shard, self._row, self._step = (int(v) for v in values)
        self._current = None


def eval_examples(corpus: StreamedCorpus, max_len: int) -> Examples | None:
    """The eval documents' pieces as in-memory Examples: the hold-out of the first shard, or
    every shard of an eval corpus."""
    indices = ([corpus.holdout_shard] if corpus.holdout_shard is not None
               else range(len(corpus.shards)))
    part = "eval" if corpus.holdout_shard is not None else ""
    rows = []
    for i in indices:
        docs = corpus.documents(i, part)
        if docs is not None:
            starts, lengths = pieces(docs, max_len)
            rows += [[(docs.tokens, int(a), int(n))] for a, n in zip(starts, lengths,
                                                                      strict=True)]
    if not rows:
        return None
    examples, _ = gather(rows)
    return examples
