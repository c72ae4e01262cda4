"""The hand-written backward passes equal what autodiff of the plain formulas gives.

Attention, SwiGLU and the fused head + cross-entropy have custom VJPs for speed; each is compared
here, value and gradients, with JAX's own `jax.nn.dot_product_attention` or with autodiff of the
textbook formula, on shapes that exercise their edge cases (grouped-query heads, packed and padded
rows, a sequence that is not a multiple of the loss chunk, zero loss weights, a frozen head).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import JaxftError, train_step
from jaxft.kernels import cross_entropy, swiglu
from jaxft.models import attention

TOL = dict(rtol=1e-5, atol=1e-5)


def packed_mask(batch: int, length: int) -> jax.Array:
    """Row 0: two packed examples then padding; other rows: one example, left-padded."""
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    seg[0, :5], pos[0, :5] = 1, np.arange(5)
    seg[0, 5:length - 2], pos[0, 5:length - 2] = 2, np.arange(length - 7)
    for b in range(1, batch):
        seg[b, b:], pos[b, b:] = 1, np.arange(length - b)
    return attention.attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos),
                                 jnp.asarray(pos), causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_attention_matches_jax_reference(heads, kv_heads):
    b, t, h = 3, 12, 8
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (b, t, heads, h))
    k = jax.random.normal(kk, (b, t, kv_heads, h))
    v = jax.random.normal(kv, (b, t, kv_heads, h))
    dout = jax.random.normal(kd, (b, t, heads, h))
    mask, scale = packed_mask(b, t), h**-0.5

    def ours(q, k, v):
        return attention.dot_product_attention(q, k, v, mask, scale, implementation="xla")

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")

    out, vjp = jax.vjp(ours, q, k, v)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, got, want in zip("qkv", vjp(dout), ref_vjp(dout), strict=True):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"d{name}")


def soft_capped_reference(q, k, v, mask, scale, cap):
    """Gemma 2's eager attention written out: scores capped at cap·tanh(s/cap), then masked;
    differentiated by autodiff."""
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    scores = cap * jnp.tanh(scores / cap)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", jnp.where(mask, probs, 0.0), v)


def test_soft_capped_attention_matches_autodiff():
    """The capped scores' backward (1 - tanh² through the cap) in the hand-written VJP, with a
    cap small enough to saturate, grouped heads and packed rows; cuDNN falls back to it."""
    b, t, heads, kv_heads, h, cap = 3, 12, 6, 2, 8, 0.7
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(kq, (b, t, heads, h))
    k = jax.random.normal(kk, (b, t, kv_heads, h))
    v = jax.random.normal(kv, (b, t, kv_heads, h))
    dout = jax.random.normal(kd, (b, t, heads, h))
    mask, scale = packed_mask(b, t), h**-0.5
    real = (mask.any(-1)[:, 0])[:, :, None, None]  # rows that attend to something
    dout = jnp.where(real, dout, 0.0)

    def ours(q, k, v):
        return attention.dot_product_attention(q, k, v, mask, scale, implementation="xla",
                                            soft_cap=cap)

    out, vjp = jax.vjp(ours, q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda *a: soft_capped_reference(*a, mask, scale, cap), q, k, v)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref_out, 0), **TOL)
    uncapped = attention.dot_product_attention(q, k, v, mask, scale, implementation="xla")
    assert float(jnp.abs(jnp.where(real, uncapped - out, 0)).max()) > 1e-2  # the cap bites
    for name, got, want in zip("qkv", vjp(dout), ref_vjp(dout), strict=True):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"d{name}")


def test_cudnn_cannot_cap_so_capped_attention_falls_back_with_one_line(caplog):
    q = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 2, 8), jnp.bfloat16)
    mask = packed_mask(2, 9)
    attention._log_fallback_once.cache_clear()  # said once per process: make this the once
    with caplog.at_level("WARNING"):
        got = attention.dot_product_attention(q, q, q, mask, 0.5, implementation="cudnn",
                                           soft_cap=0.3)
    want = attention.dot_product_attention(q, q, q, mask, 0.5, implementation="xla", soft_cap=0.3)
    assert (got == want).all()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cuDNN attention cannot cap attention scores (soft-capping); using the "
                     "XLA attention path"]


def test_attention_auto_is_xla_on_cpu_and_cudnn_needs_a_gpu():
    q = jnp.ones((2, 9, 2, 8), jnp.bfloat16)
    mask = packed_mask(2, 9)
    auto = attention.dot_product_attention(q, q, q, mask, 0.5)
    xla = attention.dot_product_attention(q, q, q, mask, 0.5, implementation="xla")
    assert (auto == xla).all()
    if jax.default_backend() != "gpu":
        with pytest.raises(JaxftError, match="cudnn.*GPU"):
            attention.dot_product_attention(q, q, q, mask, 0.5, implementation="cudnn")
    with pytest.raises(JaxftError, match="attention implementation 'flash' unknown"):
        attention.dot_product_attention(q, q, q, mask, 0.5, implementation="flash")


def test_swiglu_gradients_match_autodiff():
    kg, ku, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    gate, up = jax.random.normal(kg, (4, 16)) * 3, jax.random.normal(ku, (4, 16))
    dy = jax.random.normal(kd, (4, 16))
    out, vjp = jax.vjp(swiglu.swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for got, want in zip(vjp(dy), ref_vjp(dy), strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def reference_loss(h, w, targets, weights):
    logp = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 64 * 3])  # one chunk; 3 positions, padded
def test_head_cross_entropy_matches_unfused_loss(monkeypatch, chunk_elements):
    monkeypatch.setattr(cross_entropy, "CE_CHUNK_ELEMENTS", chunk_elements)
    b, t, d, vocab = 2, 11, 16, 64
    kh, kw, kt = jax.random.split(jax.random.PRNGKey(2), 3)
    h = jax.random.normal(kh, (b, t, d))
    w = jax.random.normal(kw, (d, vocab)) * 0.3
    targets = jax.random.randint(kt, (b, t), 0, vocab)
    weights = jnp.ones((b, t)).at[:, -1].set(0).at[1, :4].set(0)

    loss, (dh, dw) = jax.value_and_grad(cross_entropy.head_cross_entropy, (0, 1))(
        h, w, targets, weights)
    ref, (ref_dh, ref_dw) = jax.value_and_grad(reference_loss, (0, 1))(h, w, targets, weights)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(dh, ref_dh, **TOL)
    np.testing.assert_allclose(dw, ref_dw, **TOL)
    # A frozen head (LoRA): only the hidden states' gradient is formed, and it is the same.
    frozen_dh = jax.grad(lambda h: cross_entropy.head_cross_entropy(h, w, targets, weights) * 3)(h)
    np.testing.assert_allclose(frozen_dh, 3 * ref_dh, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "llama_linear_rope_tied", "gpt2",
                                    "gemma2_softcap_window", "gemma3_local_global_rope"])
def test_fused_training_loss_equals_transformers_loss(family, tmp_path):
    """The train step's loss (fused head + cross-entropy, untied or tied head) is HF's own;
    Gemma 2's capped logits take the unfused path and are HF's too."""
    import torch

    import jaxft
    from tests import hf_models
    from tests.test_lora import _batch

    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[family]())
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    capped = getattr(model.config, "final_logit_softcapping", None) is not None
    assert (model.output_head() is None) == capped  # the fused path unless logits are capped
    # The last token predicts nothing (loss_mask 0), as HF's shifted labels say.
    batch = _batch(np.random.RandomState(0), b=2, t=16, vocab=hf_models.VOCAB)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    with torch.no_grad():
        want = hf(ids, labels=ids).loss.item()
    sums = train_step.lm_losses(model, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["count"]), want, rtol=1e-5)


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_sinks_are_gpt_oss_eager_attention(chunked, monkeypatch):
    """gpt-oss's attention sinks (one more logit per query head in every row's softmax, with
    no value) against transformers' own `eager_attention_forward` for gpt-oss, value and
    gradients of q, k, v and the sinks by torch's autograd, with grouped heads and packed and
    padded rows; also with the queries in chunks of 4 (as long rows go where cuDNN cannot
    take them)."""
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss

    if chunked:  # 4 queries' float32 scores: 3 rows × 6 heads × 12 keys × 4 bytes each
        monkeypatch.setattr(attention, "SCORE_BYTES", 4 * 3 * 6 * 12 * 4)

    b, t, heads, kv_heads, h = 3, 12, 6, 2, 8
    kq, kk, kv, ks, kd = jax.random.split(jax.random.PRNGKey(3), 5)
    q = jax.random.normal(kq, (b, t, heads, h))
    k = jax.random.normal(kk, (b, t, kv_heads, h))
    v = jax.random.normal(kv, (b, t, kv_heads, h))
    sinks = jax.random.normal(ks, (heads,)) * 2.0
    dout = jax.random.normal(kd, (b, t, heads, h))
    mask, scale = packed_mask(b, t), h**-0.5
    real = (mask.any(-1)[:, 0])[:, :, None, None]  # rows that attend to something
    dout = jnp.where(real, dout, 0.0)

    def ours(q, k, v, sinks):
        return attention.dot_product_attention(q, k, v, mask, scale, implementation="xla",
                                               sinks=sinks)

    out, vjp = jax.vjp(ours, q, k, v, sinks)
    tq, tk, tv, tsinks = (torch.tensor(np.asarray(x), requires_grad=True)
                          for x in (q, k, v, sinks))
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks, module.training = heads // kv_heads, tsinks, False
    bias = torch.where(torch.tensor(np.asarray(mask)), 0.0, torch.finfo(torch.float32).min)
    want, _ = modeling_gpt_oss.eager_attention_forward(
        module, tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), bias, scale)
    (want * torch.tensor(np.asarray(dout))).sum().backward()
    np.testing.assert_allclose(jnp.where(real, out, 0),
                               np.where(real, want.detach().numpy(), 0), **TOL)
    without = attention.dot_product_attention(q, k, v, mask, scale, implementation="xla")
    assert float(jnp.abs(jnp.where(real, without - out, 0)).max()) > 1e-2  # the sinks matter
    for name, got, tensor in zip(["q", "k", "v", "sinks"], vjp(dout), (tq, tk, tv, tsinks),
                                 strict=True):
        np.testing.assert_allclose(got, tensor.grad.numpy(), **TOL, err_msg=f"d{name}")


def test_fused_kernels_step_aside_for_attention_sinks(caplog):
    q = jax.random.normal(jax.random.PRNGKey(4), (2, 9, 2, 8), jnp.bfloat16)
    mask, sinks = packed_mask(2, 9), jnp.asarray([0.5, -1.0])
    attention._log_fallback_once.cache_clear()
    with caplog.at_level("WARNING"):
        got = attention.dot_product_attention(q, q, q, mask, 0.5, implementation="cudnn",
                                              sinks=sinks)
    want = attention.dot_product_attention(q, q, q, mask, 0.5, implementation="xla",
                                           sinks=sinks)
    assert (got == want).all()
    assert [r.getMessage() for r in caplog.records] == [
        "cudnn attention cannot take attention sinks; using the XLA attention path"]
