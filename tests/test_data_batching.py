"""The batch contract, packing, exact resumption, multi-host slicing and the eval pass."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft import data
from jaxft.data import order, packing
from jaxft.errors import JaxftError
from tests.test_data_helpers import (
    FAQ,
    SUPPORT_CHAT,
    TICKETS,
    all_batches,
    assert_batches_equal,
    config,
    minilm_dir,
)

T = 128


def build(tok, path=FAQ, *, global_batch_size=4, process_index=0, process_count=1, **overrides):
    overrides.setdefault("max_len", T)
    overrides.setdefault("eval_fraction", 0.2)
    return data.build_data(config(path, **overrides), tok, global_batch_size=global_batch_size,
                           process_index=process_index, process_count=process_count)


def check_contract(batch, examples=None):
    """Every invariant of the LM batch contract, row by row."""
    assert {k: v.dtype.name for k, v in batch.items()} == {
        "input_ids": "int32", "targets": "int32", "loss_mask": "float32",
        "segment_ids": "int32", "positions": "int32", "attention_mask": "int32"}
    shapes = {v.shape for v in batch.values()}
    assert len(shapes) == 1
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    for r in range(batch["input_ids"].shape[0]):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        ids, tgt, mask = batch["input_ids"][r], batch["targets"][r], batch["loss_mask"][r]
        n_real = int((seg > 0).sum())
        assert (seg[n_real:] == 0).all() and (seg[:n_real] > 0).all()  # padding only at the end
        assert (mask[n_real:] == 0).all() and (tgt[n_real:] == 0).all()
        assert (pos[n_real:] == 0).all()
        ids_in_row = seg[:n_real]
        assert (np.diff(ids_in_row) >= 0).all() and (np.diff(ids_in_row) <= 1).all()
        if n_real:
            assert ids_in_row[0] == 1
        for s in np.unique(ids_in_row):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # one contiguous block per example
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            np.testing.assert_array_equal(tgt[where[:-1]], ids[where[1:]])  # next token
            assert tgt[where[-1]] == 0 and mask[where[-1]] == 0  # nothing after the last token
            assert set(np.unique(mask[where])) <= {0.0, 1.0}


@pytest.mark.parametrize("packed", [True, False])
def test_batches_follow_the_contract(tok, packed):
    bundle = build(tok, SUPPORT_CHAT, packing=packed)
    for batch in all_batches(bundle.train, 12):
        check_contract(batch)
        assert batch["input_ids"].shape == (4, T)
        if not packed:
            assert batch["segment_ids"].max() == 1
    for batch in bundle.eval_batches():
        check_contract(batch)


def test_packing_fills_rows_without_splitting_examples(tok):
    packed = build(tok, packing=True, eval_fraction=0.0)
    padded = build(tok, packing=False, eval_fraction=0.0)
    it = packed.train
    lengths = it.examples.lengths
    for epoch in range(3):
        rows = it.epoch_rows(epoch)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each once
        assert all(lengths[row].sum() <= T for row in rows)
    assert packed.stats["rows_per_epoch"] < padded.stats["rows_per_epoch"] == len(lengths)
    assert packed.stats["packing_efficiency"] > 1.5 * padded.stats["packing_efficiency"]
    # the arrays hold exactly the planned rows, example by example
    rows = it.epoch_rows(0)[:4]
    batch = next(it)
    for r, row in enumerate(rows):
        seg = batch["segment_ids"][r]
        assert [int((seg == s).sum()) for s in range(1, len(row) + 1)] == list(lengths[row])
        for s, i in enumerate(row, 1):
            a, b = it.examples.offsets[i], it.examples.offsets[i + 1]
            np.testing.assert_array_equal(batch["input_ids"][r][seg == s], it.examples.tokens[a:b])


def test_first_fit_is_deterministic_and_tighter_than_next_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=2000)
    visit = order.epoch_order(len(lengths), seed=1, epoch=0)
    rows = packing.plan_rows(lengths, visit, 128, packing=True)
    assert rows == packing.plan_rows(lengths, visit, 128, packing=True)
    next_fit, room = 0, 0
    for n in lengths[visit]:
        if n > room:
            next_fit, room = next_fit + 1, 128
        room -= n
    assert len(rows) < 0.9 * next_fit
    assert packing.efficiency(lengths, len(rows), 128) > 0.9


def test_epochs_reshuffle_deterministically(tok):
    a, b = build(tok).train, build(tok).train
    assert a.epoch_rows(0) == b.epoch_rows(0) and a.epoch_rows(1) == b.epoch_rows(1)
    assert a.epoch_rows(0) != a.epoch_rows(1)
    c = build(tok, seed=1).train
    assert c.epoch_rows(0) != a.epoch_rows(0)


@pytest.mark.parametrize("packed", [True, False])
def test_restored_iterator_continues_exactly(tok, packed):
    def fresh():
        return build(tok, packing=packed, global_batch_size=5).train

    reference = fresh()
    rows_per_epoch = len(reference.epoch_rows(0))
    assert rows_per_epoch % 5  # so some batches straddle an epoch boundary
    n = 3 * rows_per_epoch // 5 + 3  # a little over three epochs
    expected = all_batches(reference, n)
    boundary = rows_per_epoch // 5  # the batch that crosses into epoch 1
    for k in (1, boundary, boundary + 1, n - 2):
        interrupted = fresh()
        all_batches(interrupted, k)
        state = interrupted.get_state()
        assert set(state) == {"epoch", "row", "step", "examples"}
        assert all(isinstance(v, int) for v in state.values()) and state["step"] == k
        restored = fresh()
        restored.set_state(state)
        assert_batches_equal(all_batches(restored, n - k), expected[k:])
        via_constructor = data.TrainIterator(restored.examples, seq_len=T, global_batch_size=5,
                                             packing=packed, seed=0, pad_id=restored.pad_id,
                                             process_index=0, process_count=1, state=state)
        assert_batches_equal(all_batches(via_constructor, 2), expected[k:k + 2])
    assert reference.epoch >= 3  # several epoch boundaries were crossed


def test_state_from_other_data_is_refused(tok):
    it = build(tok).train
    state = dict(it.get_state(), examples=999)
    with pytest.raises(JaxftError, match="state was saved for 999 examples but the data now has"):
        it.set_state(state)
    with pytest.raises(JaxftError, match=r"state lacks \['row'\]"):
        it.set_state({"epoch": 0, "step": 0, "examples": 24})


@pytest.mark.parametrize("packed", [True, False])
def test_processes_get_disjoint_slices_of_the_global_batch(tok, packed):
    whole = build(tok, SUPPORT_CHAT, packing=packed, global_batch_size=4)
    halves = [build(tok, SUPPORT_CHAT, packing=packed, global_batch_size=4, process_index=p,
                    process_count=2) for p in (0, 1)]
    assert halves[0].train.local_batch_size == 2
    for _ in range(9):  # past the end of the first epoch
        g = next(whole.train)
        local = [next(h.train) for h in halves]
        for k in g:
            np.testing.assert_array_equal(np.concatenate([local[0][k], local[1][k]]), g[k])
        rows = [{tuple(r) for r in part["input_ids"]} for part in local]
        assert not rows[0] & rows[1]
    for g, l0, l1 in zip(whole.eval_batches(), *(h.eval_batches() for h in halves), strict=True):
        for k in g:
            np.testing.assert_array_equal(np.concatenate([l0[k], l1[k]]), g[k])


def test_batch_size_must_split_over_processes(tok):
    with pytest.raises(JaxftError, match=r"global_batch_size=5 must be a positive multiple of the "
                                         r"process count \(2\)"):
        build(tok, global_batch_size=5, process_index=0, process_count=2)


def test_eval_is_one_padded_pass_over_every_example(tok):
    bundle = build(tok, packing=False, global_batch_size=4, eval_fraction=0.2)
    n_eval = bundle.stats["eval_examples"]
    assert n_eval == 6
    batches = list(bundle.eval_batches())
    assert len(batches) == len(bundle.eval) == 2
    real_rows = [b["segment_ids"].max(axis=1) > 0 for b in batches]
    assert [int(r.sum()) for r in real_rows] == [4, 2]
    last = batches[-1]
    assert (last["loss_mask"][2:] == 0).all() and (last["attention_mask"][2:] == 0).all()
    again = list(bundle.eval_batches())  # re-iterable, same batches
    assert_batches_equal(again, batches)


@pytest.mark.slow
def test_classification_eval_marks_padding_rows_invalid():
    bert = data.load_tokenizer(minilm_dir())
    bundle = data.build_data(config(TICKETS, max_len=32, eval_fraction=0.25), bert,
                             global_batch_size=8, task="classification",
                             process_index=0, process_count=1)
    batches = list(bundle.eval_batches())
    assert sum(b["valid"].sum() for b in batches) == bundle.stats["eval_examples"] == 10
    assert batches[-1]["valid"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert (batches[-1]["attention_mask"][2:] == 0).all()


@pytest.mark.slow
def test_to_global_arrays_assembles_the_batch(tok):
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    bundle = build(tok, global_batch_size=len(devices))
    local = next(bundle.train)
    arrays = data.to_global_arrays(local, sharding)
    for k, v in local.items():
        assert arrays[k].shape == v.shape and arrays[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)
    bert = data.load_tokenizer(minilm_dir())
    cls = data.build_data(config(TICKETS, max_len=16), bert, global_batch_size=len(devices),
                          task="classification", process_index=0, process_count=1)
    arrays = data.to_global_arrays(next(cls.train), sharding)
    assert arrays["labels"].sharding.spec == PartitionSpec("data")
