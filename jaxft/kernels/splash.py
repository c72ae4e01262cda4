"""Splash attention: the Pallas TPU flash-attention kernel JAX ships, behind jaxft's attention.

`jax.experimental.pallas.ops.tpu.splash_attention` computes attention block by block in VMEM,
never materialising the [T, S] scores in HBM, and skips blocks its mask rules out (above the
diagonal, outside a sliding window). It is what MaxText trains with on TPU; jaxft uses it as
shipped rather than a kernel of its own.

The kernel builds its mask from segment ids and indices: a query attends to the keys of its own
segment at or before its index (and, with a window, fewer than `sliding_window` back). That is
exactly jaxft's mask (`attention.attention_mask`, which compares positions) for every batch jaxft
makes, since positions rise by one along each packed example; padding is segment 0, which no
real token attends to, so what padding rows compute never reaches the loss.

Under a mesh (the train step traces under one: `sharding.traced_under`) the kernel runs per
device in a `shard_map`, rows over data × fsdp × expert and heads over tensor, since XLA cannot
partition a Pallas call itself. Off a TPU (the tests) it runs in Pallas' interpreter, as plain
HLO that XLA partitions like any other.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from jaxft import target
from jaxft.sharding import BATCH_AXES

Array = jax.Array
LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # tried largest first: bigger blocks, fewer grid steps
HEAD_DIMS = (64, 80, 96, 128, 256)  # head dims it has been compiled for TPU with


def unsupported(q_len: int, kv_len: int, head_dim: int) -> str | None:
    """Why the kernel cannot take these shapes (a reason to log and fall back), or None."""
    if q_len != kv_len:
        return "queries and keys differ in length (decoding from a KV cache)"
    if q_len % LANES:
        return f"sequence length {q_len} is not a multiple of {LANES}"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {', '.join(map(str, HEAD_DIMS))}"
    return None


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, *,
                     sliding_window: int | None = None, soft_cap: float | None = None) -> Array:
    """Causal grouped-query attention, q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] ->
    [B,T,N,H] in q's dtype; `soft_cap` caps the scaled scores (the kernel's own
    `attn_logits_soft_cap`). Check `unsupported` first."""
    b, t, n, _ = q.shape
    kv_heads = k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    interpret = target.platform() != "tpu"
    if interpret or mesh.empty or not set(BATCH_AXES + ("tensor",)) <= set(mesh.axis_names):
        # Interpreted, the kernel is plain HLO that XLA partitions itself (and XLA:CPU cannot
        # run an interpreted kernel inside a shard_map).
        return _per_device(q, k, v, segment_ids, scale, sliding_window, soft_cap, interpret)
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    tensor = mesh.shape["tensor"]
    batch_axes = BATCH_AXES if b % rows == 0 else None
    head_axis = "tensor" if n % tensor == 0 and kv_heads % tensor == 0 else None
    heads = PartitionSpec(batch_axes, None, head_axis, None)
    fn = functools.partial(_per_device, scale=scale, sliding_window=sliding_window,
                           soft_cap=soft_cap, interpret=interpret)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads,
                                                  PartitionSpec(batch_axes, None)),
                         out_specs=heads, check_vma=False)(q, k, v, segment_ids)


def _per_device(q, k, v, segment_ids, scale, sliding_window, soft_cap, interpret):
    t, n = q.shape[1], q.shape[2]
    kernel = _kernel(t, n, sliding_window, soft_cap, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # B T N H -> B N T H  # noqa: E731
    q = (q * jnp.asarray(scale, q.dtype))  # the kernel does not scale
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v), segment_ids=ids)
    return heads_first(out)


@functools.lru_cache(maxsize=64)
def _kernel(seq_len: int, heads: int, sliding_window: int | None, soft_cap: float | None,
            interpret: bool):
    """One example's kernel, [N,T,H] × [K,T,H]: built once per shape (the mask is analysed on
    the host when it is made)."""
    shape = (seq_len, seq_len)
    if sliding_window is None or sliding_window >= seq_len:
        mask = splash.CausalMask(shape)
    else:  # keys 0..window-1 back: causal and local in one mask
        mask = splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    block = next(size for size in BLOCKS if seq_len % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    # The kernel holds its mask's block tables as arrays: made concrete here even when the first
    # call comes inside a trace, so the cached kernel never carries a tracer into the next one.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret,
                                      attn_logits_soft_cap=soft_cap)
