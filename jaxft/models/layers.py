"""Building blocks shared by every model family.

Einsum axis letters used throughout the models:
  B batch, T query positions, S key positions, D model width, F MLP width,
  N query heads, K key/value heads, G query heads per key/value head (N = K·G), H head dim, V vocab.

Every parameter carries `axes`: a tuple of logical axis names, one per array dimension. They mean
nothing to the model; `jaxft.sharding` maps them onto a device mesh through one rules table.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import target
from jaxft.errors import JaxftError
from jaxft.kernels import attention as attention_kernel
from jaxft.kernels import splash as splash_kernel
from jaxft.kernels.swiglu import swiglu  # noqa: F401  (the families' MLP activation)

Array = jax.Array


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: tuple, dtype) -> nnx.Param:
    """A parameter with its logical axis names attached."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=axes)


class DropoutKey(nnx.Variable):
    """A dropout PRNG key: neither trained nor saved; the train step writes a fresh one (per
    layer when stacked) every step, derived from the step number, so a resumed run repeats it."""


class Dropout(nnx.Module):
    """Inverted dropout at `rate`, with its own key (`layers` leading keys when it is created
    inside an already stacked module, as LoRA's are).

    Off when `deterministic` is set: `model.eval()`, which `jaxft.from_pretrained` applies as
    transformers' `from_pretrained` does; training calls `model.train()`. A rate of 0 holds no
    key and costs nothing.
    """

    def __init__(self, rate: float, *, layers: int | None = None):
        lead = () if layers is None else (layers,)
        self.rate = rate
        self.key = (DropoutKey(jnp.zeros((*lead, 2), jnp.uint32),
                               axes=("layers", None) if lead else (None,))
                    if rate > 0 else None)
        self.deterministic = False

    @property
    def active(self) -> bool:
        return self.key is not None and not self.deterministic

    def __call__(self, x: Array) -> Array:
        if not self.active:
            return x
        keep = jax.random.bernoulli(self.key[...], 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


class Linear(nnx.Module):
    """`x @ kernel + bias`, with the kernel stored [in, out] and an optional additive adapter.

    `adapter` is None unless LoRA is applied (`jaxft.lora`); the model never needs to know what
    the adapter is, only that its output, given the input, the weight and the projection before
    its bias, adds to the projection.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        bias: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=None,
    ):
        self.kernel = param(rngs, nnx.initializers.normal(0.02), (d_in, d_out), axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (d_out,), (axes[1],), param_dtype) if bias else None
        )
        self.adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    @property
    def packed(self) -> bool:
        """The kernel is a frozen, quantized one (`jaxft.quant`): any module that stands in for
        a [in, out] weight through `dequantize(dtype)`."""
        return not isinstance(self.kernel, nnx.Variable)

    @property
    def kernel_dtype(self):
        return self.kernel.dtype if self.packed else self.kernel[...].dtype

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """[*layers, in, out], packed or not (outside the layer scan: the whole stack's)."""
        return tuple(self.kernel.shape)

    @property
    def kernel_axes(self) -> tuple:
        """The kernel's logical axis names, packed or not."""
        if self.packed:
            return self.kernel.axes
        return tuple(self.kernel.get_metadata().get("axes") or (None,) * self.kernel.ndim)

    def weight(self, dtype) -> Array:
        """The kernel [in, out] in `dtype`; a packed kernel is dequantized here, inside the
        projection, so only one layer's dense weight ever exists, and only transiently."""
        return self.kernel.dequantize(dtype) if self.packed else self.kernel[...].astype(dtype)

    def _packed_matmul(self, x: Array, dtype) -> Array:
        """x @ dequantize(kernel), rematerialised: the backward pass dequantizes again rather
        than keep every layer's dense weight from the forward pass (which, under the layer scan
        without remat, would hold the whole base in the compute dtype after all)."""
        graphdef, packed = nnx.split(self.kernel)

        def project(inputs, state):
            return inputs @ nnx.merge(graphdef, state).dequantize(dtype)

        return jax.checkpoint(project)(x.astype(dtype), packed)

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or self.kernel_dtype
        # Flattened to [tokens, in]: with the leading axes kept, XLA:CPU lays out the weight
        # gradients of the stacked layers (and LoRA's) as strided transposes that cost more than
        # the matmuls themselves.
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        weight = self.weight(dtype)  # XLA drops it where nothing below reads it
        y = self._packed_matmul(x, dtype) if self.packed else x.astype(dtype) @ weight
        # An adapter sees the weight and the projection before its bias: DoRA rescales both.
        extra = (None if self.adapter is None
                 else self.adapter(x, weight=weight, projected=y).astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if extra is not None:
            y = y + extra
        return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
    """A token (or position) table [V, D]; `attend` reuses it as a tied output head."""

    def __init__(
        self,
        num: int,
        dim: int,
        axes: tuple[str, str],
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=None,
    ):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (num, dim), axes, param_dtype)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)

    def attend(self, x: Array) -> Array:
        """Logits against the table, for tied input/output embeddings."""
        dtype = self.dtype or self.embedding[...].dtype
        return jnp.einsum("btd,vd->btv", x.astype(dtype), self.embedding[...].astype(dtype))

    def as_head(self) -> Array:
        """The table as a [D, V] output-head matrix in the compute dtype (tied embeddings), for
        a loss that fuses the head with the cross-entropy."""
        return self.embedding[...].T.astype(self.dtype or self.embedding[...].dtype)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm, computed in float32 and cast back before the scale, exactly as HF does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """GPT-2/BERT LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...] + self.bias[...]).astype(x.dtype)




# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention_mask(
    q_segments: Array,
    kv_segments: Array,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    *,
    causal: bool,
    sliding_window: int | None = None,
) -> Array:
    """A boolean [B, 1, T, S] mask: who may attend to whom.

    Segment ids say which example a token belongs to (0 = padding, 1, 2, … for packed examples),
    so attention never crosses examples; a KV cache marks its empty slots with segment 0. Causality
    is decided by positions, which restart inside each packed example.
    """
    mask = q_segments[:, :, None] == kv_segments[:, None, :]
    if causal:
        delta = q_positions[:, :, None] - kv_positions[:, None, :]
        mask &= delta >= 0
        if sliding_window is not None:
            mask &= delta < sliding_window
    return mask[:, None, :, :]


def causal_lm_inputs(
    input_ids: Array,
    padding_mask: Array | None,
    segment_ids: Array | None,
    positions: Array | None,
    cache: Any,
) -> tuple[Array, Array, Array | None, Any]:
    """(positions, mask [B,1,T,S], segment ids, cache) for a decoder call, with transformers'
    defaults.

    Segments come from `segment_ids` (packed rows), else from `padding_mask` (HF's
    attention_mask: 0 is padding, segment 0), else one segment per row; positions default to
    0..T-1. With a KV cache the new tokens take its next slots and see every earlier slot of
    their segment; the segment ids come back only without a cache, when the mask is theirs
    alone (what `dot_product_attention`'s splash kernel takes instead of the mask).
    """
    b, t = input_ids.shape
    if segment_ids is None:
        segment_ids = (jnp.ones((b, t), jnp.int32) if padding_mask is None
                       else padding_mask.astype(jnp.int32))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
        mask = attention_mask(segment_ids, segment_ids, positions, positions, causal=True)
        return positions, mask, segment_ids, cache
    cache = cache.add(segment_ids, positions)
    return positions, cache.mask(segment_ids, positions), None, cache


class Masks(NamedTuple):
    """The two masks a decoder with sliding-window layers needs: `full` [B,1,T,S] for global
    layers, `local` (None without a window) for layers that see `window` positions back."""

    full: Array
    local: Array | None = None
    window: int | None = None


def decoder_masks(mask: Array, q_positions: Array, cache: Any, window: int | None) -> Masks:
    """`Masks` from a full causal mask (`causal_lm_inputs`'): the local one keeps keys fewer
    than `window` positions back (transformers' sliding-window overlay, `kv > q - window`).
    Keys are the queries themselves without a cache, else the cache's slots."""
    if window is None:
        return Masks(mask)
    kv_positions = q_positions if cache is None else cache.positions
    delta = q_positions[:, :, None] - kv_positions[:, None, :]
    return Masks(mask, mask & (delta < window)[:, None], window)


def layer_attention(q: Array, k: Array, v: Array, masks: Masks, local: Array | bool,
                    scale: float, *, implementation: str = "auto", **kwargs) -> Array:
    """`dot_product_attention` for one layer of a stack that mixes local (sliding-window) and
    global layers: `local` is a Python bool when every layer is alike, else this layer's flag,
    traced under the layer scan.

    A traced flag selects the mask, which is all the XLA and cuDNN paths need; splash builds its
    mask from a static window, so where it may run the flag chooses between two kernel calls
    (`lax.cond`), each exact for its kind of layer.
    """
    def attend(is_local: bool, mask: Array) -> Array:
        return dot_product_attention(q, k, v, mask, scale, implementation=implementation,
                                     sliding_window=masks.window if is_local else None,
                                     **kwargs)

    if masks.local is None:
        return attend(False, masks.full)
    if isinstance(local, bool):
        return attend(local, masks.local if local else masks.full)
    splash_possible = implementation == "splash" or (implementation == "auto"
                                                     and target.platform() == "tpu")
    if splash_possible:
        return jax.lax.cond(local, lambda: attend(True, masks.local),
                            lambda: attend(False, masks.full))
    # A traced flag: `attend` sees no static window, which only splash would have needed.
    return dot_product_attention(q, k, v, jnp.where(local, masks.local, masks.full), scale,
                                 implementation=implementation, **kwargs)


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


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array, scale: float, *, implementation: str = "auto",
    causal: bool = False, probs_dropout: Dropout | None = None, segment_ids: Array | None = None,
    sliding_window: int | None = None, soft_cap: float | None = None,
) -> Array:
    """Grouped-query attention: q [B,T,N,H], k/v [B,S,K,H], mask [B,1,T,S] -> [B,T,N,H].

    `implementation`, for the platform being compiled for (`jaxft.target`):
    - 'xla': einsum-softmax-einsum with a hand-written backward (`jaxft.kernels.attention`),
      what XLA:CPU runs best, and the path every other choice falls back to;
    - 'cudnn': `jax.nn.dot_product_attention`'s fused cuDNN flash kernel (GPU, 16-bit), which
      takes `mask` as a bias;
    - 'splash': Pallas splash attention (`jaxft.kernels.splash`, TPU; interpreted elsewhere),
      which builds the mask from `segment_ids` and `sliding_window` instead of `mask`;
    - 'auto': cuDNN on a GPU in 16-bit, splash on a TPU, 'xla' otherwise.
    The fused kernels need queries and keys to be the same tokens (training and evaluation;
    decoding from a cache stays on 'xla'); splash also needs `segment_ids` (the [B,T] ids `mask`
    was built from, positions rising by one along each segment) and shapes it takes, and falls
    back with one logged line when it cannot. `causal` says that `mask` already hides every
    later token (true of packed causal LMs, whose positions grow within each example). Scores
    and softmax run in float32 whatever the compute dtype, as HF's eager path does. An active
    `probs_dropout` (training BERT or GPT-2) drops attention probabilities as HF does; that
    takes the plain path, whose autodiff keeps the dropped probabilities (no fused kernel
    drops them). `soft_cap` (Gemma 2) caps the scaled scores at `cap · tanh(s / cap)` before the
    mask, as transformers' eager path does; splash and 'xla' do it exactly, cuDNN cannot, so a
    capped call asked for cuDNN takes 'xla' and says so once.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise JaxftError(
            f"attention implementation {implementation!r} unknown "
            f"(known: {', '.join(ATTENTION_IMPLEMENTATIONS)})"
        )
    platform = target.platform()
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    dropping = probs_dropout is not None and probs_dropout.active
    self_attention = q.shape[1] == k.shape[1]
    if implementation == "auto":
        causal_batch = causal and segment_ids is not None  # what splash builds its mask from
        implementation = {"gpu": "cudnn" if half else "xla",
                          "tpu": "splash" if causal_batch else "xla"}.get(platform, "xla")
        if not self_attention or dropping:  # decoding from a cache; dropped probabilities
            implementation = "xla"
    if implementation == "splash":
        reason = ("attention dropout is on" if dropping else
                  "it needs a causal mask and its segment ids" if segment_ids is None
                  or not causal else splash_kernel.unsupported(q.shape[1], k.shape[1],
                                                               q.shape[-1]))
        if reason is None:
            return splash_kernel.splash_attention(q, k, v, segment_ids, scale,
                                                  sliding_window=sliding_window,
                                                  soft_cap=soft_cap)
        if self_attention:  # decoding from a cache is expected to take the XLA path: no line
            _log_fallback_once(f"splash attention cannot take this call ({reason}); "
                               "using the XLA attention path")
        implementation = "xla"
    if implementation == "cudnn" and soft_cap is not None:
        _log_fallback_once("cuDNN attention cannot cap attention scores (soft-capping); using "
                           "the XLA attention path")
        implementation = "xla"
    if implementation == "cudnn":
        if not (platform == "gpu" and half):
            raise JaxftError(
                f"attention implementation 'cudnn' needs a GPU and a 16-bit compute dtype; "
                f"this is {platform} with {q.dtype} (use 'auto' or 'xla')"
            )
        if not dropping:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=causal and self_attention,
                implementation="cudnn",
            )
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # B K G T H
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B K S H
    if dropping:
        scores, lse = attention_kernel.scores_and_lse(q, k, mask[:, :, None], scale, soft_cap)
        probs = probs_dropout(jnp.exp(scores - lse)).astype(v.dtype)
        out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    out = attention_kernel.attention(q, k, v, mask[:, :, None], scale, soft_cap)  # B 1 1 T S
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@functools.lru_cache(maxsize=None)
def _log_fallback_once(message: str) -> None:
    """A fallback is said once per distinct reason, not once per layer or per trace."""
    logging.warning(message)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (LLaMA family)
# ---------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _powers(dim: int, theta: float) -> np.ndarray:
    """θ^(2i/d) for the [d/2] rotated pairs, in float32 as transformers computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(theta) ** exponents).astype(np.float32)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """The [H/2] inverse frequencies, computed in float32 as transformers does (`head_dim` is
    the rotated width: less than the head with partial rotary embeddings). For longrope these
    are the short-context ones (`longrope_frequencies` gives both sets)."""
    inv_freq = (1.0 / _powers(head_dim, theta)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "longrope":
        return longrope_frequencies(head_dim, theta, scaling)[0]
    if rope_type == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise JaxftError(
        f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    )


def longrope_frequencies(dim: int, theta: float, scaling: dict) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE's (Phi-3) short- and long-context inverse frequencies, `1 / (factor · θ^(i/d))`
    with the per-frequency `short_factor` and `long_factor`, as transformers computes them."""
    powers = _powers(dim, theta)
    short, long = (np.asarray(scaling[k], np.float32) for k in ("short_factor", "long_factor"))
    return ((1.0 / (short * powers)).astype(np.float32),
            (1.0 / (long * powers)).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary embedding of one kind of layer, as plain (hashable) numbers.

    `inv_freq` rotates the first `2·len(inv_freq)` dims of each head (all of them unless the
    embedding is partial, as Phi-4-mini's is); cos and sin are multiplied by `scale` (longrope's
    attention factor). With `long_inv_freq`, a batch whose largest position reaches past
    `original_max` uses those instead, the rule transformers applies per forward call.
    """

    inv_freq: tuple[float, ...]
    scale: float = 1.0
    long_inv_freq: tuple[float, ...] | None = None
    original_max: int | None = None

    @classmethod
    def from_hf(cls, head_dim: int, theta: float, scaling: dict | None, *,
                partial_rotary_factor: float = 1.0,
                max_position_embeddings: int | None = None) -> Rope:
        """From config.json's rope settings, with transformers' defaults for longrope."""
        dim = int(head_dim * partial_rotary_factor)
        scaling = scaling or {}
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            return cls(tuple(rope_inverse_frequencies(dim, theta, scaling or None).tolist()))
        original = scaling.get("original_max_position_embeddings")
        if original is None:
            raise JaxftError("longrope rope_scaling needs original_max_position_embeddings")
        factor = scaling.get("factor") or (max_position_embeddings or original) / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = (1.0 if factor <= 1.0
                                else math.sqrt(1 + math.log(factor) / math.log(original)))
        short, long = longrope_frequencies(dim, theta, scaling)
        return cls(tuple(short.tolist()), float(attention_factor), tuple(long.tolist()),
                   int(original))

    def frequencies(self, positions: Array) -> Array:
        """The inverse frequencies [R/2] for a call at these positions."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if self.long_inv_freq is None:
            return inv_freq
        long = jnp.max(positions) + 1 > self.original_max
        return jnp.where(long, jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)

    def __call__(self, x: Array, positions: Array, inv_freq: Array | None = None) -> Array:
        """x [B,T,heads,H] rotated by its positions [B,T]."""
        if inv_freq is None:
            inv_freq = self.frequencies(positions)
        return apply_rope(x, positions, inv_freq, self.scale)


def apply_rope(x: Array, positions: Array, inv_freq: Array, scale: float = 1.0) -> Array:
    """Rotate x [B,T,heads,H] by its positions [B,T], HF's half-split layout (rotate_half);
    only the first `2·len(inv_freq)` dims when the embedding is partial."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # B T R/2
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # B T 1 R
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rotary = emb.shape[-1]
    x, passed = x[..., :rotary], x[..., rotary:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos + rotated * sin
    return out if passed.shape[-1] == 0 else jnp.concatenate([out, passed], axis=-1)


# ---------------------------------------------------------------------------------------------
# Layer stacks: one set of arrays with a leading `layers` axis, run under `jax.lax.scan`
# ---------------------------------------------------------------------------------------------

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
    per_layer: dict[str, Array] | None = None, **kwargs
) -> tuple[Array, Any]:
    """Run `h, layer_cache = layer(h, cache=layer_cache, **per_layer[i], **kwargs)` over a
    stacked module.

    `cache` (a pytree with a leading layer axis, or None when training) goes in one layer slice
    at a time and comes back updated, so generation needs no second code path. `per_layer`
    holds arrays with a leading layer axis that differ between layers (Gemma's local/global
    flag); `kwargs` are the same for every layer.
    """
    graphdef, state = nnx.split(stack)

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
