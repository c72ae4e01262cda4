"""Seeded orderings that never change: the eval hold-out and each epoch's shuffle.

Both come from a fixed integer hash (splitmix64) of (seed, salt, index) rather than from a numpy
random generator, whose streams are not promised to stay the same across numpy versions. A run
restarted on another machine therefore sees the same split and the same batches.
"""

from __future__ import annotations

import numpy as np

_HOLDOUT_SALT = 0x5EED_E7A1
_SHARD_SALT = 0x5AA2_D000_0000
_MASK64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def hash64(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, salt, index): uint64 values that look uniformly random."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) + np.uint64((seed * 0x9E37_79B9 + salt) & 0xFFFF_FFFF_FFFF_FFFF)
        x = (x + np.uint64(0x9E37_79B9_7F4A_7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits examples 0..n-1: a fresh permutation per epoch."""
    return permutation(n, seed, epoch + 1)


def shard_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` reads a streamed corpus's shards 0..n-1."""
    return permutation(n, seed, _SHARD_SALT + epoch)


def permutation(n: int, seed: int, salt: int) -> np.ndarray:
    """A permutation of 0..n-1 fixed by (seed, salt)."""
    keys = hash64(seed, salt, np.arange(n))
    return np.argsort(keys, kind="stable").astype(np.int64)


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices, each ascending: `fraction` of n rows go to eval.

    At least one row goes to each side whenever fraction > 0 and n >= 2, so a tiny file still
    gets an eval set instead of silently having none.
    """
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    n_eval = min(n - 1, max(1, round(n * fraction)))
    ranked = np.argsort(hash64(seed, _HOLDOUT_SALT, np.arange(n)), kind="stable")
    return np.sort(ranked[n_eval:]), np.sort(ranked[:n_eval])
