"""Attention with a flash-style backward: softmax(q kᵀ · scale, masked) v, in float32 scores.

Axis letters as in `jaxft.models.layers`: B batch, K key/value heads, G query heads per key/value
head, T query positions, S key positions, H head dim. `jaxft.models.attention.dot_product_attention`
chooses between this kernel and cuDNN's and lays heads out for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# A finite stand-in for -inf: fully masked rows (padding attending to nothing) stay NaN-free.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def scores_and_lse(q: Array, k: Array, mask: Array, scale: float,
                   soft_cap: float | None = None,
                   sinks: Array | None = None) -> tuple[Array, Array]:
    """Masked scores [B,K,G,T,S] in float32 and their logsumexp over keys [B,K,G,T,1].

    With `soft_cap` (Gemma 2) the scaled scores are capped first, `cap · tanh(s / cap)`, as
    transformers' eager attention does before it adds the mask. `sinks` [K,G] (gpt-oss) are one
    more logit per head that every row's softmax includes and no value follows: they join the
    logsumexp only."""
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(mask, scores, MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    if sinks is not None:
        lse = jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, :, :, None, None])
    return scores, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q: Array, k: Array, v: Array, mask: Array, sinks: Array | None, scale: float,
              soft_cap: float | None = None) -> Array:
    """softmax(q kᵀ · scale, masked) v in the head-major layout, q [B,K,G,T,H], k/v [B,K,S,H];
    `sinks` [K,G] or None (see `scores_and_lse`).

    The backward is written out, as flash attention does it: the forward keeps only the
    logsumexp of each row, and the backward recomputes the probabilities from it. Autodiff of
    the plain softmax instead keeps every [T, S] intermediate per layer and reduces over them
    twice, which costs XLA:CPU more than the matmuls do; here the row term of the softmax
    gradient is `sum(dout * out)`, over H rather than S.
    """
    scores, lse = scores_and_lse(q, k, mask, scale, soft_cap, sinks)
    return jnp.einsum("bkgts,bksh->bkgth", jnp.exp(scores - lse).astype(v.dtype), v)


def _attention_fwd(q, k, v, mask, sinks, scale, soft_cap):
    scores, lse = scores_and_lse(q, k, mask, scale, soft_cap, sinks)
    out = jnp.einsum("bkgts,bksh->bkgth", jnp.exp(scores - lse).astype(v.dtype), v)
    return out, (q, k, v, mask, sinks, lse, out)


def _attention_bwd(scale, soft_cap, residuals, dout):
    q, k, v, mask, sinks, lse, out = residuals
    scores, _ = scores_and_lse(q, k, mask, scale, soft_cap)
    probs = jnp.exp(scores - lse)  # B K G T S, float32
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(dout.dtype), dout)
    dprobs = jnp.einsum("bkgth,bksh->bkgts", dout, v, preferred_element_type=jnp.float32)
    row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dscores = probs * (dprobs - row)
    if soft_cap is not None:  # d(cap·tanh(s/cap))/ds = 1 - tanh²; masked scores carry no gradient
        capped = jnp.where(mask, scores / soft_cap, 0.0)
        dscores = dscores * (1.0 - capped * capped)
    dscores = (dscores * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", dscores, k)
    dk = jnp.einsum("bkgts,bkgth->bksh", dscores, q)
    dsinks = None
    if sinks is not None:  # its probability exp(σ - lse) times -row, summed over the rows
        sink_probs = jnp.exp(sinks.astype(jnp.float32)[None, :, :, None, None] - lse)
        dsinks = -jnp.sum(sink_probs * row, axis=(0, 3, 4)).astype(sinks.dtype)
    return dq, dk, dv, None, dsinks


attention.defvjp(_attention_fwd, _attention_bwd)
