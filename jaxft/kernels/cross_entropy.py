"""The output head and next-token cross-entropy, fused: `h @ w` is never held whole in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import target

# Logits `head_cross_entropy` holds at once. On a CPU 4 MiB of float32, small enough to stay
# near the cache; on an accelerator 512 MiB, so each chunk is a matmul of ~1,000 rows that keeps
# the matrix units busy (a 128k vocabulary at 1,000 positions, not 8).
CE_CHUNK_ELEMENTS = 1 << 20
CE_CHUNK_ELEMENTS_ACCELERATOR = 1 << 27


@jax.custom_vjp
def head_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array,
                       weights: jax.Array) -> jax.Array:
    """`sum weights * (logsumexp(h @ w) - (h @ w)[targets])` for h [B, T, D] and w [D, V].

    The matmul takes w's dtype and accumulates logits in float32 (for a bfloat16 model that is
    a little more exact than the unfused loss, which rounds logits to bfloat16 first), a chunk
    of positions (all B rows, so a batch-sharded h stays sharded) at a time. The gradient is
    formed in the forward pass while each chunk's logits are at hand (softmax minus one-hot,
    times the weight); the loss is a sum, so the backward pass only scales it by the scalar
    cotangent. The weight gradient is skipped when w is frozen (LoRA).
    """
    return _cross_entropy_chunks(h, w, targets, weights, need_dh=False, need_dw=False)[0]


def _cross_entropy_chunks(h, w, targets, weights, *, need_dh: bool, need_dw: bool):
    b, t, d = h.shape
    vocab = w.shape[1]
    # When the head trains, a chunk has at least D rows: its logits are then no bigger than the
    # head's gradient, which is accumulated once per chunk.
    elements = CE_CHUNK_ELEMENTS if target.platform() == "cpu" else \
        CE_CHUNK_ELEMENTS_ACCELERATOR
    rows = max(elements // vocab, d if need_dw else 1)
    chunk = max(1, min(t, rows // b))  # positions per chunk
    pad = -t % chunk  # padded positions weigh 0

    def chunks(x):  # [B, T, ...] -> [T/chunk, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

    @jax.named_scope("cross_entropy")
    def body(dw, x):
        hc, tc, wc = (a.reshape(b * chunk, *a.shape[2:]) for a in x)  # B·C rows
        logits = jnp.matmul(hc, w, preferred_element_type=jnp.float32)  # B·C V
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        loss = jnp.sum((lse - target_logit) * wc)
        dh = None
        if need_dh or need_dw:
            one_hot = jnp.arange(vocab, dtype=tc.dtype) == tc[:, None]
            dlogits = (jnp.exp(logits - lse[:, None]) - one_hot) * wc[:, None]  # B·C V
            dlogits = dlogits.astype(w.dtype)
            dh = (dlogits @ w.T).reshape(b, chunk, d) if need_dh else None
            if need_dw:
                dw = dw + jnp.matmul(hc.T, dlogits, preferred_element_type=jnp.float32)
        return dw, (loss, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32) if need_dw else None
    xs = (chunks(h.astype(w.dtype)), chunks(targets), chunks(weights))
    dw, (losses, dh) = jax.lax.scan(body, dw0, xs)
    if dh is not None:  # [T/chunk, B, chunk, D] -> [B, T, D]
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, -1, d)[:, :t].astype(h.dtype)
    return jnp.sum(losses), dh, None if dw is None else dw.astype(w.dtype)


def _cross_entropy_fwd(h, w, targets, weights):
    loss, dh, dw = _cross_entropy_chunks(h.value, w.value, targets.value, weights.value,
                                         need_dh=h.perturbed, need_dw=w.perturbed)
    return loss, (dh, dw)


def _cross_entropy_bwd(residuals, g):
    dh, dw = residuals
    scale = lambda x: None if x is None else (x * g).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, None


head_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd, symbolic_zeros=True)
