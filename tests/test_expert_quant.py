"""A quantized base under a mixture of experts: `lora.base_quant` nf4 and int8 pack the expert
weights too, each expert exactly as bitsandbytes packs that expert's [out, in] matrix, and
widths a block cannot hold, or MXFP4 on a model without experts, are refused in one line."""

import bitsandbytes.functional as bnbf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import lora, quant
from jaxft.errors import JaxftError
from tests import hf_models
from tests.test_moe import saved

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_experts_are_bitsandbytes_expert_by_expert(kind, tmp_path):
    """Qwen3-MoE as released (one tensor per expert and projection, the gate and up halves
    packed into one weight as they stream in): every expert's dequantized weights are
    bitsandbytes' own for that expert's matrix, bit for bit, and the model computes with
    them, adapters on the experts included."""
    hf = saved("qwen3_moe_topk_norm", tmp_path, moe_intermediate_size=64)
    model = jaxft.from_pretrained(tmp_path, quantize=kind)
    module = model.model.layers.mlp.experts
    for name in EXPERT_WEIGHTS:
        assert module.packed(name)
        ours = np.asarray(module.weight(name).dequantize(jnp.float32))  # L E in out
        for layer in range(ours.shape[0]):
            fused = getattr(hf.model.layers[layer].mlp.experts, name).detach()  # E out in
            for expert in range(fused.shape[0]):
                w = fused[expert].contiguous()
                if kind == "nf4":
                    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
                    want = bnbf.dequantize_4bit(packed, state)
                else:
                    values, absmax, _ = bnbf.int8_vectorwise_quant(w.clone())
                    want = bnbf.int8_vectorwise_dequant(values, absmax)
                np.testing.assert_array_equal(ours[layer, expert].T, want.float().numpy(),
                                              err_msg=f"{name} layer {layer} expert {expert}")

    # the model runs on exactly those weights (the projections' too, packed as in test_quant)
    dense = quant.dequantize_model(jaxft.from_pretrained(tmp_path, quantize=kind))
    assert not dense.model.layers.mlp.experts.packed("down_proj")
    ids, mask = hf_models.padded_batch()
    lora.apply_lora(model, lora.LoraConfig(rank=2, targets=("q_proj",),
                                           target_parameters=("mlp.experts.down_proj",)))
    np.testing.assert_allclose(np.asarray(model(ids, mask)), np.asarray(dense(ids, mask)),
                               atol=1e-5, rtol=0)
    packed_bytes, packed_params = quant.packed_size(model)
    assert packed_params == sum(np.prod(module.weight_shape(n)) for n in EXPERT_WEIGHTS) + \
        sum(np.prod(linear.kernel_shape) for _, linear in lora.linear_modules(model)
            if linear.packed)


def test_quantizing_a_loaded_moe_equals_quantizing_while_loading(tmp_path):
    saved("mixtral_gqa_window", tmp_path, intermediate_size=64)
    streamed = jaxft.from_pretrained(tmp_path, quantize="nf4").model.layers.mlp.experts
    loaded = quant.quantize_model(jaxft.from_pretrained(tmp_path), quant.QuantConfig("nf4"))
    for name in EXPERT_WEIGHTS:
        for part in ("codes", "absmax"):
            np.testing.assert_array_equal(
                np.asarray(getattr(streamed.weight(name), part)[...]),
                np.asarray(getattr(loaded.model.layers.mlp.experts.weight(name), part)[...]))


@pytest.mark.parametrize("name, kind, message", [
    ("qwen3_moe_topk_norm", "nf4", "lora.base_quant nf4: model.layers.mlp.experts.down_proj "
     "has 32 inputs, not a multiple of the 64 weights a block holds"),
    ("llama", "mxfp4", "lora.base_quant mxfp4 packs a mixture of experts' expert weights, and "
     "this llama model has none"),
])
def test_quantized_experts_that_cannot_be_packed_are_named(name, kind, message, tmp_path):
    hf_models.build(hf_models.CAUSAL_CONFIGS[name]()).save_pretrained(tmp_path)
    with pytest.raises(JaxftError) as err:
        jaxft.from_pretrained(tmp_path, quantize=kind)
    assert message in str(err.value)
