"""Attention for every family: the masks (segments, causality, sliding windows, a KV cache's
slots), the decoder inputs derived from them, and the dispatch to a kernel for the platform the
program is compiled for (`jaxft.target`): XLA's, cuDNN's fused one, or Pallas splash.

Axis letters as in `layers`: B batch, T query positions, S key positions, N query heads, K
key/value heads, G query heads per key/value head, H head dim.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft import target
from jaxft.errors import JaxftError
from jaxft.kernels import attention as attention_kernel
from jaxft.kernels import splash as splash_kernel
from jaxft.models.layers import Dropout
from jaxft.sharding import BATCH_AXES

Array = jax.Array


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




ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array, scale: float, *, implementation: str = "auto",
    causal: bool = False, probs_dropout: Dropout | None = None, segment_ids: Array | None = None,
    sliding_window: int | None = None, soft_cap: float | None = None,
    sinks: Array | None = None,
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
    capped call asked for cuDNN takes 'xla' and says so once. `sinks` [N] (gpt-oss) add one
    logit per query head to every row's softmax, with no value behind it; only 'xla' has them,
    so the fused kernels step aside for them, saying so once.
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
    if sinks is not None and implementation in ("splash", "cudnn"):
        _log_fallback_once(f"{implementation} attention cannot take attention sinks; using "
                           "the XLA attention path")
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
        reason = cudnn_unsupported(q.shape[1], k.shape[1], q.shape[-1])
        if reason is not None:
            _log_fallback_once(f"cuDNN attention cannot take this call ({reason}); using the "
                               "XLA attention path")
        elif not dropping:
            q, k, v, mask = _one_sharding(q, k, v, mask)
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=causal and self_attention,
                implementation="cudnn",
            )
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # B K G T H
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B K S H
    if sinks is not None:
        sinks = sinks.reshape(kv_heads, n // kv_heads)  # K G, as the query heads
    if dropping:
        scores, lse = attention_kernel.scores_and_lse(q, k, mask[:, :, None], scale, soft_cap,
                                                      sinks)
        probs = probs_dropout(jnp.exp(scores - lse)).astype(v.dtype)
        out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    out = _query_chunked(q, k, v, mask[:, :, None], sinks, scale, soft_cap)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# The float32 scores one pass of the XLA kernel may hold: beyond it the queries go in chunks.
SCORE_BYTES = 256 * 2**20


def _query_chunked(q: Array, k: Array, v: Array, mask: Array, sinks: Array | None,
                   scale: float, soft_cap: float | None) -> Array:
    """The XLA kernel over chunks of queries, one after another (`lax.map`), when the whole
    [B,K,G,T,S] score tensor would pass `SCORE_BYTES`: every query's row is its own softmax,
    so the chunks compute exactly the whole, and only a chunk's scores (and in the backward,
    its recomputed probabilities) exist at once. That is what keeps long rows of models that
    cuDNN cannot take (gpt-oss's sinks, Gemma 2's caps) to a bounded footprint on a GPU."""
    b, kv_heads, groups, t, h = q.shape
    per_query = b * kv_heads * groups * k.shape[2] * 4
    chunks = next(n for n in range(1, t + 1) if t % n == 0 and t // n * per_query <= SCORE_BYTES
                  or n == t)
    if chunks == 1:
        return attention_kernel.attention(q, k, v, mask, sinks, scale, soft_cap)
    size = t // chunks

    def split(x: Array) -> Array:  # [.., T, X] -> [chunks, .., T/chunks, X]
        return jnp.moveaxis(x.reshape(*x.shape[:3], chunks, size, x.shape[-1]), 3, 0)

    masks = split(mask) if mask.shape[3] == t else None

    def one(args):
        q_chunk, mask_chunk = args
        return attention_kernel.attention(q_chunk, k, v, mask if mask_chunk is None
                                          else mask_chunk, sinks, scale, soft_cap)

    out = jax.lax.map(one, (split(q), masks))
    return jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, groups, t, h)


CUDNN_MAX_HEAD_DIM = 128  # on every GPU; 256 from Hopper on, which only a real device shows


def cudnn_unsupported(q_len: int, kv_len: int, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot take these shapes on every GPU (a reason to log and
    fall back), or None. JAX asks the host's backend, not the compile target, whether the
    card is a Hopper (which takes head dims up to 256), so a dry run from a machine without a
    GPU would refuse what the card runs; the rule here is the one every card keeps, so the
    planned program is the trained one."""
    if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8:
        return f"head dim {head_dim} is not a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}"
    if q_len % 2 or kv_len % 2:
        return f"sequence lengths {q_len}, {kv_len} are not even"
    return None


def _one_sharding(q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, ...]:
    """q, k, v (and the mask) constrained to one sharding, as cuDNN's partitioner requires of
    them under a mesh: rows over the batch axes, heads over `tensor` when both head counts
    divide it (with grouped-query heads the propagated shardings of q and k/v differ)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return q, k, v, mask
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    rows = math.prod(mesh.shape[a] for a in axes)
    batch = axes if axes and q.shape[0] % rows == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 \
        else None
    qkv = P(batch, None, heads, None)
    q, k, v = (jax.lax.with_sharding_constraint(x, qkv) for x in (q, k, v))
    return q, k, v, jax.lax.with_sharding_constraint(mask, P(batch, None, None, None))


@functools.lru_cache(maxsize=None)
def _log_fallback_once(message: str) -> None:
    """A fallback is said once per distinct reason, not once per layer or per trace."""
    logging.warning(message)
