"""Splash attention (Pallas' TPU kernel, run here in Pallas' interpreter) equals JAX's own XLA
attention on jaxft's masks: values and gradients, packed and padded rows, grouped-query heads,
Mistral's sliding window, and traced under a (2, 2, 2) mesh.

Asked for splash, jaxft's attention falls back to XLA (with one logged line) when a call does not
qualify, so every comparison below also asserts that the kernel is in the traced program: a
fallback would otherwise compare XLA with XLA and pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import sharding
from jaxft.models import attention

VALUES = dict(rtol=1e-5, atol=1e-5)
GRADIENTS = dict(rtol=1e-4, atol=1e-4)
T = 256


def packed_rows(batch: int, length: int = T) -> tuple[np.ndarray, np.ndarray]:
    """Row 0: three packed examples then padding; row 1: one example filling it; the rest: one
    example then padding. Positions restart in each example, as jaxft's packing writes them."""
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    spans = {0: [(0, 70), (70, 200), (200, 230)], 1: [(0, length)]}
    for b in range(batch):
        for i, (lo, hi) in enumerate(spans.get(b, [(0, length - 17 * b)]), start=1):
            seg[b, lo:hi], pos[b, lo:hi] = i, np.arange(hi - lo)
    return seg, pos


def inputs(batch, heads, kv_heads, head_dim, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, T, heads, head_dim))
    k = jax.random.normal(kk, (batch, T, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, T, kv_heads, head_dim))
    dout = jax.random.normal(kd, (batch, T, heads, head_dim))
    return q, k, v, dout


def kernel_calls(fn, *args, backward: bool = True) -> int:
    """Pallas kernel calls in the program `fn` traces to (with its backward pass)."""

    def forward_and_back(*a):
        out, vjp = jax.vjp(fn, *a)
        return vjp(out)

    traced = jax.make_jaxpr(forward_and_back if backward else fn)(*args)
    return str(traced).count("pallas_call")


def compare(q, k, v, dout, seg, pos, window=None, run=lambda f: f, soft_cap=None):
    """Splash vs `jax.nn.dot_product_attention` (JAX's XLA reference; jaxft's own XLA path
    with a soft cap, which JAX's lacks) on real tokens; padding rows compute something
    different in each and reach no loss, so their cotangent is 0."""
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    mask = attention.attention_mask(seg, seg, pos, pos, causal=True, sliding_window=window)
    scale = q.shape[-1] ** -0.5
    real = (seg > 0)[:, :, None, None]
    dout = jnp.where(real, dout, 0.0)

    def splash(q, k, v):
        return attention.dot_product_attention(q, k, v, mask, scale, implementation="splash",
                                            causal=True, segment_ids=seg, sliding_window=window,
                                            soft_cap=soft_cap)

    def reference(q, k, v):
        if soft_cap is not None:
            return attention.dot_product_attention(q, k, v, mask, scale, implementation="xla",
                                                soft_cap=soft_cap)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")

    assert kernel_calls(run(splash), q, k, v) >= 2  # the kernel, forward and backward
    out, vjp = jax.vjp(run(splash), q, k, v)
    want, want_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, want, 0), **VALUES)
    for name, got, expected in zip("qkv", vjp(dout), want_vjp(dout), strict=True):
        np.testing.assert_allclose(got, expected, **GRADIENTS, err_msg=f"d{name}")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (2, 1, 128)])  # GQA, MQA
def test_splash_equals_xla_packed_and_grouped(heads, kv_heads, head_dim):
    q, k, v, dout = inputs(3, heads, kv_heads, head_dim)
    compare(q, k, v, dout, *packed_rows(3))


@pytest.mark.slow
def test_splash_sliding_window_equals_xla():
    q, k, v, dout = inputs(2, 4, 2, 64, seed=1)
    compare(q, k, v, dout, *packed_rows(2), window=48)


@pytest.mark.slow
def test_splash_soft_cap_equals_xla():
    """Gemma 2's capped scores: the kernel's own `attn_logits_soft_cap` with a window."""
    seg, pos = packed_rows(2)
    compare(*inputs(2, 4, 2, 64, seed=3), seg, pos, window=40, soft_cap=0.5)


def test_splash_under_a_mesh_equals_xla():
    """Traced under a (2, 2, 2) mesh, as the train step traces it (on a TPU this is the
    per-device shard_map path, which `test_tpu_compile` compiles)."""
    mesh = sharding.make_mesh(2, 2, 2)
    q, k, v, dout = inputs(4, 4, 2, 64, seed=2)
    compare(q, k, v, dout, *packed_rows(4),
            run=lambda f: jax.jit(sharding.traced_under(mesh, f)))


def test_splash_falls_back_to_xla_with_one_line(caplog):
    """A length the kernel cannot tile and active attention dropout take the XLA path."""
    b, t, n, h = 2, 100, 2, 64
    q = jax.random.normal(jax.random.PRNGKey(3), (b, t, n, h))
    seg = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention.attention_mask(seg, seg, pos, pos, causal=True)
    def splash(q):
        return attention.dot_product_attention(q, q, q, mask, 0.125, implementation="splash",
                                               causal=True, segment_ids=seg)

    with caplog.at_level("WARNING"):
        got = splash(q)
    assert kernel_calls(splash, q) == 0
    want = attention.dot_product_attention(q, q, q, mask, 0.125, implementation="xla")
    np.testing.assert_array_equal(got, want)
    assert any("sequence length 100 is not a multiple of 128" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("family", ["mistral", "gpt2", "gemma2"])
def test_models_with_splash_give_transformers_logits(family, tmp_path):
    """A Mistral (grouped-query heads, a 48-token window over 128 tokens), a GPT-2 and a
    Gemma 2 (local and global layers, so each layer's flag picks one of two kernels; capped
    scores), loaded with `attention="splash"`: their logits equal transformers' own, a padded
    row included."""
    import torch
    import transformers

    import jaxft
    from tests import hf_models

    if family == "mistral":
        config = transformers.MistralConfig(
            vocab_size=hf_models.VOCAB, hidden_size=128, intermediate_size=192,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            sliding_window=48, max_position_embeddings=256)
    elif family == "gemma2":
        config = transformers.Gemma2Config(
            vocab_size=hf_models.VOCAB, hidden_size=128, intermediate_size=192,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            sliding_window=48, query_pre_attn_scalar=64, attn_logit_softcapping=0.05,
            final_logit_softcapping=1.0, max_position_embeddings=256, pad_token_id=0,
            eos_token_id=1, bos_token_id=2)
    else:
        config = transformers.GPT2Config(vocab_size=hf_models.VOCAB, n_positions=128, n_embd=128,
                                         n_layer=2, n_head=2)
    config._attn_implementation = "eager"
    hf = hf_models.build(config)
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, hf_models.VOCAB, (2, 128))
    mask = np.ones((2, 128), np.int64)
    mask[1, 100:] = 0  # right padding: HF's positions stay 0..T-1 on the real tokens
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    model = jaxft.from_pretrained(tmp_path, attention="splash")
    call = lambda ids, mask: model(ids, mask)  # noqa: E731
    assert kernel_calls(call, jnp.asarray(ids), jnp.asarray(mask), backward=False)  # splash
    got = np.asarray(call(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
