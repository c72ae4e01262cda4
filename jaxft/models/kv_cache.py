"""The key/value cache that generation threads through a causal LM: it goes in, it comes back out.

    cache = Cache.init(num_layers=L, batch=B, length=S, kv_heads=K, head_dim=H, dtype=...)
    logits, cache = model(ids, segment_ids=seg, positions=pos, cache=cache)   # prefill, T tokens
    logits, cache = model(next_ids, segment_ids=..., positions=..., cache=cache)  # one more

Shapes are static (S slots, fixed at init), so a prefill and a decode step each compile once. A
call with T tokens writes slots `[end, end + T)` for every row at once. Each slot remembers the
segment id and position of the token in it; empty slots and left padding carry segment 0, so
`mask` is the training mask (`attention.attention_mask`) between the new tokens and the slots —
same segment, causal by position, sliding window by position — and a cached forward computes
exactly what a full forward over the whole sequence computes.

Keys and values live in `LayerCache` with a leading layer axis, which `stack.scan_layers`
slices one layer at a time; the write index `end` is stored per layer for the same reason (all
layers hold the same value). Axis letters: L layers, B batch, S cache slots, T new tokens,
K key/value heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxft.models import attention

Array = jax.Array


@struct.dataclass
class LayerCache:
    """Keys and values of one layer ([B,S,K,H], `end` []) or of all layers (leading L axis)."""

    k: Array  # (L) B S K H
    v: Array  # (L) B S K H
    end: Array  # (L) int32: slots already written; the next tokens go to [end, end + T)

    def update(self, k: Array, v: Array) -> tuple[Array, Array, LayerCache]:
        """Write the new keys/values k, v [B,T,K,H] at `end`; return all slots and the cache."""
        start = (0, self.end, 0, 0)
        k_all = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start)
        return k_all, v_all, LayerCache(k_all, v_all, self.end + k.shape[1])


@struct.dataclass
class Cache:
    """Every layer's keys/values plus, per slot, the segment id and position of its token."""

    layers: LayerCache  # k, v [L,B,S,K,H], end [L]
    segment_ids: Array  # B S int32, 0 = empty slot or padding
    positions: Array  # B S int32

    @classmethod
    def init(cls, *, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
             dtype) -> Cache:
        """An empty cache of `length` slots."""
        kv = jnp.zeros((num_layers, batch, length, kv_heads, head_dim), dtype)
        return cls(
            layers=LayerCache(kv, kv, jnp.zeros((num_layers,), jnp.int32)),
            segment_ids=jnp.zeros((batch, length), jnp.int32),
            positions=jnp.zeros((batch, length), jnp.int32),
        )

    @property
    def end(self) -> Array:
        """How many slots are written (the same in every layer)."""
        return self.layers.end[0]

    def add(self, segment_ids: Array, positions: Array) -> Cache:
        """Record segment ids and positions [B,T] of the tokens about to be written at `end`.

        Keys and values follow layer by layer (`LayerCache.update` inside the layer scan).
        """
        start = (0, self.end)
        return self.replace(
            segment_ids=jax.lax.dynamic_update_slice(
                self.segment_ids, segment_ids.astype(jnp.int32), start),
            positions=jax.lax.dynamic_update_slice(
                self.positions, positions.astype(jnp.int32), start),
        )

    def mask(self, segment_ids: Array, positions: Array) -> Array:
        """[B,1,T,S]: which slots each new token may attend to (call after `add`); layers with
        a sliding window narrow it (`attention.decoder_masks`)."""
        return attention.attention_mask(segment_ids, self.segment_ids, positions, self.positions,
                                     causal=True)
