"""A mixture-of-experts MLP: a top-k router and experts run as grouped matmuls.

Each token goes to its `k` best experts. The token copies are sorted by expert and each
expert's run of rows is multiplied by that expert's weights in one `jax.lax.ragged_dot`: no
Python loop over experts, no dense all-experts compute, and no token is dropped (no capacity
factor), which is what transformers computes. The router also returns the statistics of
transformers' load-balancing loss (`load_balancing_loss`), summed over the tokens that count.

Expert weights are stored as transformers 5 holds them fused, transposed to jaxft's [in, out]:
`gate_up_proj` [E, D, 2F] (the gate's F columns, then the up projection's) and `down_proj`
[E, F, D].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.kernels.swiglu import swiglu
from jaxft.models import layers

Array = jax.Array
# An adapter on an expert projection: (rows grouped by expert, group sizes) -> its addition.
Extra = Callable[[Array, Array], Array]
# The expert weights an adapter can sit on, in the order transformers defines them (which is the
# order PEFT nests its wrappers in).
PARAMETERS = ("gate_up_proj", "down_proj")


class RouterStats(NamedTuple):
    """One layer's routing over the tokens that count (padding excluded): how many of the
    tokens' top-k choices went to each expert, the sum of each expert's router probability, and
    the token count. Summed over layers they give transformers' load-balancing loss."""

    load: Array  # [E] top-k assignments per expert
    probability: Array  # [E] summed softmax probabilities
    tokens: Array  # [] tokens counted


def load_balancing_loss(stats: RouterStats) -> Array:
    """transformers' `load_balancing_loss_func` (Switch Transformer, eqs. 4-6) from stats
    summed over layers: E · Σₑ fₑ·Pₑ, with fₑ the share of assignments and Pₑ the mean router
    probability of expert e, both over every layer's counted tokens."""
    experts = stats.load.shape[-1]
    return experts * jnp.sum((stats.load / stats.tokens) * (stats.probability / stats.tokens))


def route(logits: Array, k: int, normalize: bool) -> tuple[Array, Array, Array]:
    """(top-k weights [N, k] float32, expert indices [N, k], probabilities [N, E] float32) from
    router logits [N, E]: softmax in float32, the k largest, renormalised to sum to one when
    `normalize` (Mixtral always; Qwen's `norm_topk_prob`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, indices = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, indices, probs


def grouped_swiglu(x: Array, weights: Array, indices: Array, gate_up: Array, down: Array, *,
                   gate_up_extra: Extra | None = None,
                   down_extra: Extra | None = None) -> Array:
    """Σⱼ weightsⱼ · down_e(silu(gate_e(x)) · up_e(x)) over each token's experts e = indicesⱼ.

    x [N, D], weights and indices [N, k], gate_up [E, D, 2F], down [E, F, D]. The N·k token
    copies are sorted by expert (a stable sort: tokens keep their order inside each expert) so
    each expert's rows are contiguous for `ragged_dot`, then put back and summed. An `extra`
    (an adapter: `extra(rows, group_sizes)`) adds to its projection's output.
    """
    n, k = indices.shape
    experts = gate_up.shape[0]
    flat = indices.reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # [N·k, D], grouped by expert
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    projected = jax.lax.ragged_dot(rows, gate_up, sizes)
    if gate_up_extra is not None:
        projected = projected + gate_up_extra(rows, sizes).astype(projected.dtype)
    gate, up = jnp.split(projected, 2, axis=-1)
    hidden = swiglu(gate, up)
    out = jax.lax.ragged_dot(hidden, down, sizes)  # [N·k, D]
    if down_extra is not None:
        out = out + down_extra(hidden, sizes).astype(out.dtype)
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    mixed = jnp.einsum("nkd,nk->nd", unsorted.reshape(n, k, -1).astype(jnp.float32),
                       weights.astype(jnp.float32))
    return mixed.astype(x.dtype)


class Router(nnx.Module):
    """`mlp.gate`: one logit per expert, [D, E]. Not a `layers.Linear`: transformers 5 holds it
    as a parameter of its own module, so PEFT adapts it as a parameter (`mlp.gate.weight` in
    `target_parameters`); its `adapter` (a `jaxft.lora.LoRA`) adds to the logits."""

    def __init__(self, d: int, experts: int, *, rngs: nnx.Rngs, param_dtype, dtype=None):
        self.kernel = layers.param(rngs, nnx.initializers.normal(0.02), (d, experts),
                                   ("embed", None), param_dtype)
        self.adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or self.kernel[...].dtype
        x = x.astype(dtype)
        logits = x @ self.kernel[...].astype(dtype)
        return logits if self.adapter is None else logits + self.adapter(x).astype(dtype)


class Experts(nnx.Module):
    """`mlp.experts`: E gated MLPs of width F, stacked. Each weight may carry an adapter
    (`<weight>_adapter`, PEFT's `target_parameters`: `jaxft.lora.ExpertLoRA`), which the model
    only calls."""

    def __init__(self, d: int, f: int, experts: int, *, rngs: nnx.Rngs, param_dtype,
                 dtype=None):
        init = nnx.initializers.normal(0.02)
        self.gate_up_proj = layers.param(rngs, init, (experts, d, 2 * f),
                                         ("experts", "embed", "mlp"), param_dtype)
        self.down_proj = layers.param(rngs, init, (experts, f, d), ("experts", "mlp", "embed"),
                                      param_dtype)
        self.gate_up_proj_adapter: nnx.Module | None = nnx.data(None)
        self.down_proj_adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    def adapter(self, name: str) -> nnx.Module | None:
        """The adapter on the weight `name` (one of `PARAMETERS`), or None."""
        return getattr(self, f"{name}_adapter")

    def set_adapter(self, name: str, adapter: nnx.Module | None) -> None:
        setattr(self, f"{name}_adapter", adapter)

    def __call__(self, x: Array, weights: Array, indices: Array) -> Array:
        dtype = self.dtype or self.gate_up_proj[...].dtype
        return grouped_swiglu(x.astype(dtype), weights, indices,
                              self.gate_up_proj[...].astype(dtype),
                              self.down_proj[...].astype(dtype),
                              gate_up_extra=self.gate_up_proj_adapter,
                              down_extra=self.down_proj_adapter)


def expert_modules(model: nnx.Module) -> Iterator[tuple[str, Experts]]:
    """(dotted path, module) for every `Experts` of a model: where expert adapters attach."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Experts):
            yield ".".join(str(p) for p in path), module


def router_modules(model: nnx.Module) -> Iterator[tuple[str, Router]]:
    """(dotted path, module) for every `Router` of a model: where router adapters attach."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Router):
            yield ".".join(str(p) for p in path), module


class SparseMoeBlock(nnx.Module):
    """The MLP of a mixture-of-experts layer: route each token to `k` experts and mix their
    outputs by the router's weights. Returns (output [B, T, D], `RouterStats`)."""

    def __init__(self, d: int, f: int, experts: int, k: int, normalize: bool, *,
                 rngs: nnx.Rngs, param_dtype, dtype=None):
        self.gate = Router(d, experts, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.experts = Experts(d, f, experts, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.k = k
        self.normalize = normalize

    def __call__(self, x: Array, counted: Array) -> tuple[Array, RouterStats]:
        """`counted` [B, T] marks the tokens the load-balancing statistics include."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, probs = route(self.gate(flat), self.k, self.normalize)
        out = self.experts(flat, weights, indices).reshape(b, t, d)
        keep = counted.reshape(-1).astype(jnp.float32)
        experts = probs.shape[-1]
        load = jnp.einsum("nke,n->e", jax.nn.one_hot(indices, experts, dtype=jnp.float32), keep)
        stats = RouterStats(load, jnp.einsum("ne,n->e", probs, keep), jnp.sum(keep))
        return out, stats
