"""A mixture-of-experts MLP: a top-k router and experts run as grouped matmuls.

Each token goes to its `k` best experts. The token copies are sorted by expert and each
expert's run of rows is multiplied by that expert's weights in one grouped matmul
(`jaxft.kernels.grouped_matmul`: `jax.lax.ragged_dot`, or tiles on a GPU): no Python loop over
experts, no dense all-experts compute, and no token is dropped (no capacity factor), which is
what transformers computes. The router also returns the statistics of
transformers' load-balancing loss (`load_balancing_loss`), summed over the tokens that count.

Expert weights are stored as transformers 5 holds them fused, in jaxft's [in, out] layout:
`gate_up_proj` [E, D, 2F] and `down_proj` [E, F, D]. Qwen3-MoE and Mixtral put the gate's F
columns first, then the up projection's; gpt-oss alternates them and adds biases
(`gate_up_proj_bias` [E, 2F], `down_proj_bias` [E, D]) and a clamped SwiGLU (`GatedUnit`).
Keeping each family's own column order keeps PEFT's adapters on these weights (whose `lora_B`
rows follow it) a reshape.

Under a mesh with an `expert` axis of n devices (the train step traces under its mesh), each
device holds E/n experts and computes only their rows: the devices of the axis gather their
tokens (and routing), each runs its own experts' grouped matmuls on the copies routed to them,
and a reduce-scatter sums the experts' outputs back onto the devices that own the tokens. The
expert weights never move; tokens cross the axis twice per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxft.kernels.grouped_matmul import Packed, Weights, grouped_matmul, groups_of
from jaxft.kernels.swiglu import swiglu
from jaxft.models import layers

Array = jax.Array
# An adapter on an expert projection: (rows grouped by expert, group sizes) -> its addition.
Extra = Callable[[Array, Array], Array]
# The expert weights an adapter can sit on, in the order transformers defines them (which is the
# order PEFT nests its wrappers in).
PARAMETERS = ("gate_up_proj", "down_proj")
EXPERT_AXIS = "expert"  # the mesh axis experts are split over (`jaxft.sharding`)


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


@dataclasses.dataclass(frozen=True)
class GatedUnit:
    """How an expert turns its fused gate-and-up projection [.., 2F] into its hidden layer
    [.., F]: SwiGLU, silu(gate)·up (Qwen3-MoE, Mixtral); or gpt-oss's, whose gate and up
    columns alternate (`interleaved`) and whose SwiGLU is clamped, gate·σ(α·gate)·(up + 1)
    with the gate clamped above at `limit` and up to ±`limit`."""

    interleaved: bool = False
    alpha: float | None = None  # None: plain SwiGLU
    limit: float | None = None

    def __call__(self, projected: Array) -> Array:
        if self.interleaved:
            gate, up = projected[..., ::2], projected[..., 1::2]
        else:
            gate, up = jnp.split(projected, 2, axis=-1)
        if self.alpha is None:
            return swiglu(gate, up)
        if self.limit is not None:
            gate = jnp.minimum(gate, self.limit)
            up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


SWIGLU = GatedUnit()


def _per_row(bias: Array, groups: Array) -> Array:
    """Each sorted row's expert bias; a row of no local expert (group E) gets zeros."""
    return jnp.concatenate([bias, jnp.zeros_like(bias[:1])])[groups]


def grouped_swiglu(x: Array, weights: Array, indices: Array, gate_up: Weights, down: Weights, *,
                   gate_up_extra: Extra | None = None, down_extra: Extra | None = None,
                   first: Array | None = None, biases: tuple[Array, Array] | None = None,
                   unit: GatedUnit = SWIGLU) -> Array:
    """Σⱼ weightsⱼ · down_e(unit(gate_up_e(x))) over each token's experts e = indicesⱼ.

    x [N, D], weights and indices [N, k], gate_up [E, D, 2F], down [E, F, D], `biases`
    ([E, 2F], [E, D]) when the experts have them; gate_up and down may stay packed
    (`grouped_matmul.Packed`). The N·k token copies are sorted by expert (a
    stable sort: tokens keep their order inside each expert) so each expert's rows are
    contiguous for the grouped matmul, then put back and summed. An `extra` (an adapter:
    `extra(rows, group_sizes)`) adds to its projection's output.

    With `first`, gate_up and down hold experts first … first+E-1 of a larger set: choices of
    other experts are sorted past the last group, left out, and weigh nothing, and the sum
    comes back in float32 (a partial sum that other devices' experts complete).
    """
    n, k = indices.shape
    experts = groups_of(gate_up)
    flat = indices.reshape(-1)  # [N·k]
    if first is not None:
        local = indices - first
        mine = (local >= 0) & (local < experts)
        flat = jnp.where(mine, local, experts).reshape(-1)  # not mine: past the last group
        weights = jnp.where(mine, weights, 0)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # [N·k, D], grouped by expert
    sizes = jnp.bincount(flat, length=experts + 1)[:experts].astype(jnp.int32)
    groups = flat[order]  # each sorted row's expert (E: none of these)
    projected = grouped_matmul(rows, gate_up, sizes)
    if biases is not None:
        projected = projected + _per_row(biases[0], groups).astype(projected.dtype)
    if gate_up_extra is not None:
        projected = projected + gate_up_extra(rows, sizes).astype(projected.dtype)
    hidden = unit(projected)
    out = grouped_matmul(hidden, down, sizes)  # [N·k, D]
    if biases is not None:
        out = out + _per_row(biases[1], groups).astype(out.dtype)
    if down_extra is not None:
        out = out + down_extra(hidden, sizes).astype(out.dtype)
    if first is not None:  # rows past the groups are no expert's: whatever the matmul left
        out = jnp.where((jnp.arange(out.shape[0]) < jnp.sum(sizes))[:, None], out, 0)
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    mixed = jnp.einsum("nkd,nk->nd", unsorted.reshape(n, k, -1).astype(jnp.float32),
                       weights.astype(jnp.float32))
    return mixed if first is not None else mixed.astype(x.dtype)


def expert_ways() -> int:
    """How many devices the ambient mesh splits the experts over (1: none, or no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or EXPERT_AXIS not in mesh.axis_names else mesh.shape[EXPERT_AXIS]


def expert_parallel_swiglu(x: Array, weights: Array, indices: Array, gate_up: Weights,
                           down: Weights, adapters: tuple[nnx.Module | None, nnx.Module | None],
                           *, biases: tuple[Array, Array] | None = None,
                           unit: GatedUnit = SWIGLU) -> Array:
    """`grouped_swiglu` with the experts split over the mesh's `expert` axis: inside a
    `shard_map` over that axis alone (fsdp and tensor stay XLA's), each device gathers the
    axis's tokens, runs its own experts (and their slices of the `adapters`, modules whose
    arrays lead with the expert axis) on the copies routed to them, and a reduce-scatter sums
    the experts' outputs back to the tokens' devices."""
    graphs, states = zip(*(nnx.split(a) if a is not None else (None, None) for a in adapters),
                         strict=True)

    # Packed weights cross into the shard_map as their arrays, split by expert like the rest.
    dense = tuple(w.dense if isinstance(w, Packed) else None for w in (gate_up, down))
    arrays = tuple(w.arrays if isinstance(w, Packed) else w for w in (gate_up, down))

    def local(x, weights, indices, arrays, states, biases):
        x, weights, indices = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                               for a in (x, weights, indices))
        extras = [None if g is None else nnx.merge(g, s)
                  for g, s in zip(graphs, states, strict=True)]
        gate_up, down = (a if d is None else Packed(a, d)
                         for a, d in zip(arrays, dense, strict=True))
        first = jax.lax.axis_index(EXPERT_AXIS) * groups_of(gate_up)
        mixed = grouped_swiglu(x, weights, indices, gate_up, down, gate_up_extra=extras[0],
                               down_extra=extras[1], first=first, biases=biases, unit=unit)
        return jax.lax.psum_scatter(mixed, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    split = PartitionSpec(EXPERT_AXIS)

    def specs(tree):
        return jax.tree.map(lambda _: split, tree)

    run = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                        in_specs=(split,) * 3 + tuple(specs(t) for t in (arrays, states, biases)),
                        out_specs=split, axis_names=frozenset({EXPERT_AXIS}), check_vma=False)
    return run(x, weights, indices, arrays, states, biases).astype(x.dtype)


class Router(nnx.Module):
    """`mlp.gate` (gpt-oss: `mlp.router`, with a bias): one logit per expert, [D, E]. Not a
    `layers.Linear`: transformers holds it as a parameter of its own module, so PEFT adapts it
    as a parameter (`mlp.gate.weight` in `target_parameters`); its `adapter` (a
    `jaxft.lora.LoRA`) adds to the logits."""

    def __init__(self, d: int, experts: int, *, rngs: nnx.Rngs, param_dtype, dtype=None,
                 bias: bool = False):
        self.kernel = layers.param(rngs, layers.weight_init(), (d, experts),
                                   ("embed", None), param_dtype)
        self.bias = (layers.param(rngs, nnx.initializers.zeros, (experts,), (None,), param_dtype)
                     if bias else nnx.data(None))
        self.adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or self.kernel[...].dtype
        x = x.astype(dtype)
        logits = x @ self.kernel[...].astype(dtype)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(dtype)
        return logits if self.adapter is None else logits + self.adapter(x).astype(dtype)


class Experts(nnx.Module):
    """`mlp.experts`: E gated MLPs of width F, stacked, each with biases when `bias` (gpt-oss).
    Each weight may carry an adapter (`<weight>_adapter`, PEFT's `target_parameters`:
    `jaxft.lora.ExpertLoRA`), which the model only calls."""

    def __init__(self, d: int, f: int, experts: int, *, rngs: nnx.Rngs, param_dtype,
                 dtype=None, bias: bool = False, unit: GatedUnit = SWIGLU):
        init = layers.weight_init()
        self.gate_up_proj = layers.param(rngs, init, (experts, d, 2 * f),
                                         ("experts", "embed", "mlp"), param_dtype)
        self.down_proj = layers.param(rngs, init, (experts, f, d), ("experts", "mlp", "embed"),
                                      param_dtype)
        zeros = nnx.initializers.zeros
        self.gate_up_proj_bias = (layers.param(rngs, zeros, (experts, 2 * f), ("experts", "mlp"),
                                               param_dtype) if bias else nnx.data(None))
        self.down_proj_bias = (layers.param(rngs, zeros, (experts, d), ("experts", "embed"),
                                            param_dtype) if bias else nnx.data(None))
        self.unit = unit
        self.gate_up_proj_adapter: nnx.Module | None = nnx.data(None)
        self.down_proj_adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    def adapter(self, name: str) -> nnx.Module | None:
        """The adapter on the weight `name` (one of `PARAMETERS`), or None."""
        return getattr(self, f"{name}_adapter")

    def set_adapter(self, name: str, adapter: nnx.Module | None) -> None:
        setattr(self, f"{name}_adapter", adapter)

    # A weight is a parameter, or a packed module of a quantized base (`jaxft.quant`) that
    # stands in for one through `dequantize(dtype)`, with `shape`, `axes` and `dtype`.
    def weight(self, name: str) -> nnx.Variable | nnx.Module:
        return getattr(self, name)

    def set_weight(self, name: str, weight: nnx.Variable | nnx.Module) -> None:
        setattr(self, name, weight)

    def packed(self, name: str) -> bool:
        return not isinstance(self.weight(name), nnx.Variable)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """[*layers, E, in, out], packed or not."""
        return tuple(self.weight(name).shape)

    def weight_axes(self, name: str) -> tuple:
        weight = self.weight(name)
        return weight.axes if self.packed(name) else tuple(weight.get_metadata()["axes"])

    def weight_dtype(self, name: str):
        weight = self.weight(name)
        return weight.dtype if self.packed(name) else weight[...].dtype

    def weight_value(self, name: str) -> Array:
        """A parameter's array (not for packed weights)."""
        return self.weight(name)[...]

    def __call__(self, x: Array, weights: Array, indices: Array) -> Array:
        dtype = self.dtype or self.weight_dtype("gate_up_proj")
        x = x.astype(dtype)
        biases = None if self.gate_up_proj_bias is None else (
            self.gate_up_proj_bias[...].astype(dtype), self.down_proj_bias[...].astype(dtype))
        adapters = tuple(self.adapter(name) for name in PARAMETERS)
        if not self.packed("gate_up_proj"):
            dense = tuple(self.weight_value(name).astype(dtype) for name in PARAMETERS)
            return self._mix(x, weights, indices, dense, adapters, biases)
        # A packed base stays packed into the grouped matmuls (which dequantize it whole, or a
        # tile's expert at a time), inside a rematerialised function, so the backward pass
        # dequantizes again rather than keep every layer's dense experts from the forward pass
        # (under the layer scan that would hold the whole base in the compute dtype).
        modules = (*(self.weight(name) for name in PARAMETERS), *adapters)
        graphs, states = zip(*(nnx.split(m) if m is not None else (None, None) for m in modules),
                             strict=True)

        def dequantizer(graph):
            return lambda arrays: nnx.merge(graph, arrays).dequantize(dtype)

        def run(x, weights, indices, states, biases):
            packed = tuple(Packed(s, dequantizer(g))
                           for g, s in zip(graphs[:2], states[:2], strict=True))
            adapters = tuple(None if g is None else nnx.merge(g, s)
                             for g, s in zip(graphs[2:], states[2:], strict=True))
            return self._mix(x, weights, indices, packed, adapters, biases)

        return jax.checkpoint(run)(x, weights, indices, states, biases)

    def _mix(self, x: Array, weights: Array, indices: Array, matrices: tuple[Weights, Weights],
             adapters: tuple, biases: tuple[Array, Array] | None) -> Array:
        """The experts' outputs mixed by the routing, on one device or over the expert axis."""
        gate_up, down = matrices
        ways = expert_ways()
        if ways > 1 and x.shape[0] % ways == 0:
            return expert_parallel_swiglu(x, weights, indices, gate_up, down, adapters,
                                          biases=biases, unit=self.unit)
        return grouped_swiglu(x, weights, indices, gate_up, down, gate_up_extra=adapters[0],
                              down_extra=adapters[1], biases=biases, unit=self.unit)


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
    outputs by the router's weights. Returns (output [B, T, D], `RouterStats`).

    The router is `gate`, or `router` (gpt-oss's name) with `router_name`; gpt-oss's top-k
    softmax over the k best logits equals the renormalised top-k of the full softmax, so it is
    `normalize`. `bias` and `unit` are the experts' (`Experts`)."""

    def __init__(self, d: int, f: int, experts: int, k: int, normalize: bool, *,
                 rngs: nnx.Rngs, param_dtype, dtype=None, bias: bool = False,
                 unit: GatedUnit = SWIGLU, router_name: str = "gate"):
        setattr(self, router_name, Router(d, experts, rngs=rngs, param_dtype=param_dtype,
                                          dtype=dtype, bias=bias))
        self.experts = Experts(d, f, experts, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                               bias=bias, unit=unit)
        self.router_name = router_name
        self.k = k
        self.normalize = normalize

    def __call__(self, x: Array, counted: Array) -> tuple[Array, RouterStats]:
        """`counted` [B, T] marks the tokens the load-balancing statistics include."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        router = getattr(self, self.router_name)
        weights, indices, probs = route(router(flat), self.k, self.normalize)
        out = self.experts(flat, weights, indices).reshape(b, t, d)
        keep = counted.reshape(-1).astype(jnp.float32)
        experts = probs.shape[-1]
        load = jnp.einsum("nke,n->e", jax.nn.one_hot(indices, experts, dtype=jnp.float32), keep)
        stats = RouterStats(load, jnp.einsum("ne,n->e", probs, keep), jnp.sum(keep))
        return out, stats
