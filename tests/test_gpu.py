"""On a GPU: float32 parity with transformers on the same GPU, bfloat16 no worse than PyTorch's
own bfloat16, and cuDNN flash attention equal to the XLA path it replaces.

Skipped without a GPU (CI has none); `tools/gpu_check.sh` runs these on one, together with the
CPU parity tests (test_models, test_fused_ops, test_generate, test_peft_training_parity), which
then run their JAX side on the GPU. conftest.py asks XLA for true float32 matmuls there (by
default a GPU rounds float32 matmul inputs to TF32's 10-bit mantissa).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft.models import attention
from tests import hf_models
from tests.test_fused_ops import packed_mask

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu" or not torch.cuda.is_available(), reason="needs a GPU")

# Big enough for real GPU kernels (head dim 64, 256 tokens), small enough to build in a second.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
             vocab_size=1024)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_llama")
    model = hf_models.build(hf_models.llama_config(**SHAPE))
    model.save_pretrained(path)
    ids = np.random.RandomState(0).randint(1, SHAPE["vocab_size"], (2, 256))
    return path, model, ids


def torch_logits(model, ids, dtype) -> np.ndarray:
    model = copy.deepcopy(model).to("cuda", dtype)  # the fixture's model stays float32 on CPU
    with torch.no_grad():
        out = model(torch.from_numpy(ids).to("cuda")).logits
    return out.float().cpu().numpy()


def test_float32_logits_match_transformers_on_the_gpu(llama):
    path, hf, ids = llama
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = torch_logits(hf, ids, torch.float32)
    model = jaxft.from_pretrained(path)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert jax.devices()[0].platform == "gpu"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_is_as_close_to_float32_as_pytorchs_bfloat16(llama):
    """bfloat16 keeps 8 bits of mantissa, so no fixed tolerance is meaningful across shapes;
    the yardstick is PyTorch's own bfloat16 error against the float32 logits, on the same GPU.
    jaxft may be at most 1.5x that (a different but equally valid rounding order), and it runs
    the automatic attention choice, which is cuDNN here."""
    path, hf, ids = llama
    ref = torch_logits(hf, ids, torch.float32)
    torch_err = np.abs(torch_logits(hf, ids, torch.bfloat16) - ref).max()
    model = jaxft.from_pretrained(path, dtype="bfloat16", compute_dtype="bfloat16")
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))
    our_err = np.abs(ours - ref).max()
    print(f"max |bf16 - fp32| logit error: jaxft {our_err:.4f}, PyTorch {torch_err:.4f}")
    assert our_err <= 1.5 * torch_err + 1e-3


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_cudnn_attention_matches_xla(heads, kv_heads):
    b, t, h = 2, 256, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, t, heads, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kv_heads, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kv_heads, h), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, t, heads, h), jnp.bfloat16)
    mask, scale = packed_mask(b, t), h**-0.5

    def run(implementation):
        def f(q, k, v):
            return attention.dot_product_attention(q, k, v, mask, scale, causal=True,
                                                implementation=implementation)
        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(dout))]

    def reference(q, k, v):  # float32 throughout
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    out, vjp = jax.vjp(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    exact = [np.asarray(x) for x in (out, *vjp(dout.astype(jnp.float32)))]
    for name, cudnn, xla, want in zip(("out", "dq", "dk", "dv"), run("cudnn"), run("xla"),
                                      exact, strict=True):
        # Both bfloat16 paths are within bfloat16 rounding of the float32 answer, and cuDNN's
        # error is no more than twice the XLA path's.
        xla_err, cudnn_err = np.abs(xla - want).max(), np.abs(cudnn - want).max()
        assert cudnn_err <= 2 * xla_err + 1e-2, (name, cudnn_err, xla_err)
