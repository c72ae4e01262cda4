"""Batches in a deterministic, resumable order, each JAX process taking only its own rows.

The training stream is: epoch 0's rows, then epoch 1's, ... where epoch e visits the examples in
`order.epoch_order(n, seed, e)` and packs them with `packing.plan_rows`. Global batches are
consecutive runs of `global_batch_size` rows of that stream, crossing epoch boundaries without a
gap, so no row is dropped and none is seen twice in an epoch. Because every epoch's layout is a
pure function of (examples, seed, epoch), the position `(epoch, row)` is all the state there is:
`get_state()` returns it as a few ints and an iterator built with that state (or given it by
`set_state`) continues with exactly the batches an uninterrupted one would have produced.

Every process computes the same layout; process p keeps rows
`[p * B/P, (p + 1) * B/P)` of each global batch. `to_global_arrays` assembles those local
slices into global `jax.Array`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxft.data import order, packing
from jaxft.data.encode import Examples
from jaxft.errors import JaxftError

Batch = dict[str, np.ndarray]
STATE_KEYS = ("epoch", "row", "step", "examples")


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Each process's rows of a global batch, which every process must share equally."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise JaxftError(f"global_batch_size={global_batch_size} must be a positive multiple "
                         f"of the process count ({process_count})")
    if not 0 <= process_index < process_count:
        raise JaxftError(f"process_index={process_index} is outside [0, {process_count})")
    return global_batch_size // process_count


class _Layout:
    """How global batches map onto this process: shared by the train and eval iterators."""

    def __init__(self, examples: Examples, *, seq_len: int, global_batch_size: int,
                 packing: bool, pad_id: int, classification: bool,
                 process_index: int | None, process_count: int | None, pairs: bool = False):
        self.examples, self.seq_len, self.packing = examples, seq_len, packing and not pairs
        self.pad_id, self.classification, self.pairs = pad_id, classification, pairs
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size(global_batch_size, self.process_index,
                                                 self.process_count)

    @property
    def units(self) -> int:
        """What the order visits: examples, or preference pairs."""
        return self.examples.pairs if self.pairs else len(self.examples)

    def rows(self, visit: np.ndarray) -> list[list[int]]:
        if self.pairs:
            return [[int(i)] for i in visit]
        return packing.plan_rows(self.examples.lengths, visit, self.seq_len, self.packing)

    def file_order(self) -> EvalBatches:
        """One pass over the same examples in file order, laid out as this iterator lays them
        (the reference pass scores every pair with it)."""
        return EvalBatches(self.examples, seq_len=self.seq_len,
                           global_batch_size=self.global_batch_size, packing=self.packing,
                           pad_id=self.pad_id, classification=self.classification,
                           process_index=self.process_index, process_count=self.process_count,
                           pairs=self.pairs)

    def attach_ref_logps(self, ref_logps: np.ndarray) -> None:
        """Give every pair its reference log-probabilities [pairs, 2]: batches carry them as
        `ref_logps` from now on."""
        if ref_logps.shape != (self.units, 2) or not self.pairs:
            raise JaxftError(f"reference log-probabilities of shape {ref_logps.shape} do not fit "
                             f"{self.units} pairs")
        self.examples = dataclasses.replace(self.examples,
                                            ref_logps=ref_logps.astype(np.float32))

    def local_batch(self, global_rows: list[list[int]]) -> Batch:
        start = self.process_index * self.local_batch_size
        mine = global_rows[start:start + self.local_batch_size]
        build = (packing.pair_batch if self.pairs else packing.classification_batch
                 if self.classification else packing.lm_batch)
        return build(self.examples, mine, self.seq_len, self.pad_id)


class TrainIterator(_Layout):
    """An endless iterator of this process's slice of each global training batch.

    `get_state()` -> {'epoch', 'row', 'step', 'examples'} (ints): save it with the checkpoint and
    pass it back through `set_state` (or `state=`) to resume exactly where it stopped.
    """

    def __init__(self, examples: Examples, *, seq_len: int, global_batch_size: int, packing: bool,
                 seed: int, pad_id: int, classification: bool = False,
                 process_index: int | None = None, process_count: int | None = None,
                 state: dict[str, int] | None = None, pairs: bool = False):
        super().__init__(examples, seq_len=seq_len, global_batch_size=global_batch_size,
                         packing=packing, pad_id=pad_id, classification=classification,
                         process_index=process_index, process_count=process_count, pairs=pairs)
        self.seed = seed
        self._epoch = self._row = self._step = 0
        self._cache: dict[int, list[list[int]]] = {}
        if state is not None:
            self.set_state(state)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The example indices of every row of `epoch`, in stream order (cached: two epochs)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                del self._cache[min(self._cache)]
            self._cache[epoch] = self.rows(order.epoch_order(self.units, self.seed, epoch))
        return self._cache[epoch]

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        taken: list[list[int]] = []
        while len(taken) < self.global_batch_size:
            rows = self.epoch_rows(self._epoch)
            chunk = rows[self._row:self._row + self.global_batch_size - len(taken)]
            taken.extend(chunk)
            self._row += len(chunk)
            if self._row >= len(rows):
                self._epoch, self._row = self._epoch + 1, 0
        self._step += 1
        return self.local_batch(taken)

    def get_state(self) -> dict[str, int]:
        """Where the stream stands: the next row to read, plus a sanity check on the data size."""
        return {"epoch": self._epoch, "row": self._row, "step": self._step,
                "examples": len(self.examples)}

    def set_state(self, state: dict[str, int]) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise JaxftError(f"data iterator state lacks {missing} (expected keys {STATE_KEYS})")
        if int(state["examples"]) != len(self.examples):
            raise JaxftError(f"data iterator state was saved for {state['examples']} examples but "
                             f"the data now has {len(self.examples)}; it cannot resume exactly")
        self._epoch, self._row, self._step = (int(state[k]) for k in ("epoch", "row", "step"))

    @property
    def epoch(self) -> int:
        return self._epoch


class EvalBatches(_Layout):
    """A finite, re-iterable pass over the eval examples in file order (no shuffle).

    The last batch is padded with empty rows (loss_mask 0, or valid 0 for classification and
    pairs), so every process sees the same number of batches and every example is scored
    exactly once.
    """

    def _global_rows(self) -> list[list[int]]:
        rows = self.rows(np.arange(self.units))
        return rows + [[] for _ in range(-len(rows) % self.global_batch_size)]

    def __len__(self) -> int:
        return len(self._global_rows()) // self.global_batch_size

    def __iter__(self) -> Iterator[Batch]:
        rows, size = self._global_rows(), self.global_batch_size
        for start in range(0, len(rows), size):
            yield self.local_batch(rows[start:start + size])


def to_global_arrays(local_batch: dict[str, np.ndarray],
                     sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble every process's local rows into global arrays laid out by `sharding`.

    `sharding` describes the 2-D `[B, T]` arrays (typically `PartitionSpec('data', None)`); arrays
    of lower rank (`labels`, `valid`) use the leading part of its spec.
    """
    out = {}
    for name, value in local_batch.items():
        spec = sharding.spec
        s = sharding
        if value.ndim < len(spec):
            s = NamedSharding(sharding.mesh, PartitionSpec(*spec[: value.ndim]))
        out[name] = jax.make_array_from_process_local_data(s, value)
    return out
