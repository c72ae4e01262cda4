"""Layer stacks: identical layers fused into one set of arrays with a leading `layers` axis and
run under `jax.lax.scan` (compile time flat in depth), with the remat policies, and the body
of a decoder that the RoPE families share.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models.attention import decoder_masks

Array = jax.Array


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """Fuse identical layers into one module whose arrays gain a leading `layers` axis.

    Scanning over a stacked layer keeps compile time flat in depth; the extra axis is named so
    sharding rules can leave it unsharded.
    """
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("axes")
        value = jnp.stack([v.get_value() for v in variables])
        return variables[0].replace(value=value, axes=("layers", *axes) if axes else None)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def scan_layers(
    stack: nnx.Module, h: Array, *, remat: str = "none", cache: Any = None,
    per_layer: dict[str, Array] | None = None, layers: slice | None = None, **kwargs
) -> tuple[Array, Any]:
    """Run `h, layer_cache = layer(h, cache=layer_cache, **per_layer[i], **kwargs)` over a
    stacked module (or over its `layers` slice).

    `cache` (a pytree with a leading layer axis, or None when training) goes in one layer slice
    at a time and comes back updated, so generation needs no second code path. `per_layer`
    holds arrays with a leading layer axis that differ between layers (Gemma's local/global
    flag); `kwargs` are the same for every layer.
    """
    graphdef, state = nnx.split(stack)
    if layers is not None:
        state = jax.tree.map(lambda x: x[layers], state)

    def body(carry: Array, xs) -> tuple[Array, Any]:
        layer_state, layer_cache, layer_inputs = xs
        return nnx.merge(graphdef, layer_state)(carry, cache=layer_cache, **layer_inputs,
                                                **kwargs)

    if remat not in REMAT_POLICIES:
        raise JaxftError(f"remat policy {remat!r} unknown (known: {', '.join(REMAT_POLICIES)})")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(body, h, (state, cache, per_layer or {}))


def num_layers(stack: nnx.Module) -> int:
    """How many layers a stacked module holds."""
    return jax.tree.leaves(nnx.state(stack))[0].shape[0]


def run_decoder(stack: nnx.Module, norm: nnx.Module, h: Array, *, positions: Array,
                mask: Array, segment_ids: Array | None, cache: Any, window: int | None,
                kinds: tuple[bool, ...] | bool, remat: str) -> tuple[Array, Any]:
    """A decoder's body after its embedding, shared by the RoPE families: the local/global
    masks, one scan over the stacked layers (each told its kind: a constant when all layers are
    alike, else a per-layer flag), the final norm. Returns (hidden states, cache)."""
    masks = decoder_masks(mask, positions, cache, window)
    alike = isinstance(kinds, bool)
    h, layer_cache = scan_layers(
        stack, h, remat=remat, cache=None if cache is None else cache.layers,
        per_layer=None if alike else {"local": jnp.asarray(kinds)},
        **({"local": kinds} if alike else {}),
        positions=positions, masks=masks, segment_ids=segment_ids,
    )
    return norm(h), None if cache is None else cache.replace(layers=layer_cache)
