"""The grouped matmul of a mixture of experts: rows sorted by group, each multiplied by its
group's matrix.

`jax.lax.ragged_dot` is that op, and XLA:TPU runs it natively. XLA:GPU (as of jax 0.10)
rewrites it into a dense dot over a masked copy of the rows for every group: E times the rows'
memory and E times the FLOPs (a 32-expert layer of 8,192 rows × 2,880 holds 1.4 GiB of
temporaries for one projection's forward, 5.6 GiB with its backward, where the rows are
45 MiB). Its cuDNN ragged-dot fusion is off by default there, and on fails to compile. So on a
GPU the groups are cut into tiles instead (`tiled_grouped_matmul`): each group padded to a
whole number of tiles, one tile a step of a `lax.scan` multiplied by its group's matrix. That
costs the padding (at most one tile per group) in extra rows and nothing else, and its
backward is the scan's: the rows' gradient tile by tile, a weight's accumulated into its
group's slice, each tile's matrix sliced again rather than saved.

A quantized base's experts stay packed through it (`Packed`): the ragged dot dequantizes them
whole, the tiles one group's matrix at a step, so on a GPU no layer's dense experts ever exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxft import target

Array = jax.Array
TILE = 128  # rows per step on a GPU: a tensor-core-sized matmul, little padding per group


@dataclasses.dataclass(frozen=True)
class Packed:
    """Group matrices kept packed: `arrays`, a pytree whose leaves lead with the group axis,
    and `dense`, which turns them (all groups', or one group's slices) into [.., K, N]."""

    arrays: Any
    dense: Callable[[Any], Array]

    @property
    def groups(self) -> int:
        return jax.tree.leaves(self.arrays)[0].shape[0]


Weights = Array | Packed


def groups_of(weights: Weights) -> int:
    return weights.groups if isinstance(weights, Packed) else weights.shape[0]


def grouped_matmul(rows: Array, weights: Weights, sizes: Array) -> Array:
    """rows [M, K] (sorted by group, `sizes` [G] rows each; rows past their sum belong to no
    group and come out unspecified) @ weights [G, K, N] -> [M, N], as `jax.lax.ragged_dot`:
    natively where the compiler runs it so, in tiles on a GPU."""
    if target.platform() == "gpu":
        return tiled_grouped_matmul(rows, weights, sizes)
    dense = weights.dense(weights.arrays) if isinstance(weights, Packed) else weights
    return jax.lax.ragged_dot(rows, dense, sizes)


def tiled_grouped_matmul(rows: Array, weights: Weights, sizes: Array, tile: int = TILE
                         ) -> Array:
    """`grouped_matmul` as a scan over tiles of `tile` rows, each of one group."""
    m, k = rows.shape
    groups = groups_of(weights)
    tiles = -(-m // tile) + groups  # every row, plus at most one partial tile per group
    sizes = sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = -(-sizes // tile) * tile
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    # Where each padded slot's row comes from (padding reads row 0 and is zeroed).
    slot = jnp.arange(tiles * tile, dtype=jnp.int32)
    slot_group = jnp.minimum(jnp.searchsorted(padded_ends, slot, side="right"), groups - 1)
    offset = slot - padded_starts[slot_group]
    real = offset < sizes[slot_group]
    source = jnp.where(real, starts[slot_group] + offset, 0)
    padded_rows = jnp.where(real[:, None], rows[source], 0).reshape(tiles, tile, k)

    # Rematerialised, so the backward pass slices each tile's matrix again: saved, the slices
    # would stack into a copy of the weights per tile.
    packed = weights if isinstance(weights, Packed) else Packed(weights, lambda a: a)

    @jax.checkpoint
    def multiply(block, group, arrays):
        return block @ packed.dense(jax.tree.map(lambda a: a[group], arrays))

    def step(_, tile_and_group):
        block, group = tile_and_group
        return None, multiply(block, group, packed.arrays)

    _, out = jax.lax.scan(step, None, (padded_rows, slot_group[::tile]))
    out = out.reshape(tiles * tile, -1)
    # Each row back from its slot; rows of no group read a slot that exists and are unspecified.
    row = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), groups - 1)
    slot_of_row = jnp.minimum(padded_starts[row_group] + row - starts[row_group],
                              tiles * tile - 1)
    return out[slot_of_row]
