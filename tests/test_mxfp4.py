"""gpt-oss's MXFP4 expert weights, as OpenAI releases them: dequantized exactly as transformers'
MXFP4 integration does, loaded with the logits transformers computes from the same file, and a
tensor without its partner named in one line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxft
from jaxft.errors import JaxftError
from jaxft.hf import mxfp4
from tests import hf_models

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def packed(rng: np.random.RandomState, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 blocks [.., G, 16] (every code) and scales [.., G] from 2^-9 to 2^-2
    (weights up to 1.5)."""
    blocks = rng.randint(0, 256, (*shape, 16)).astype(np.uint8)
    return blocks, rng.randint(118, 126, shape).astype(np.uint8)


def mxfp4_checkpoint(path, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny gpt-oss saved as OpenAI ships gpt-oss: expert weights as MXFP4 blocks and scales,
    and a `quantization_config` that says so. Returns transformers' model of that file."""
    base = path / "float"
    hf_models.build(hf_models.CAUSAL_CONFIGS["gpt_oss_sinks_window"]()).save_pretrained(base)
    tensors = safetensors.numpy.load_file(base / "model.safetensors")
    rng = np.random.RandomState(seed)
    for name in [n for n in tensors if n.endswith(EXPERT_WEIGHTS)]:
        experts, d_in, d_out = tensors.pop(name).shape
        tensors[name + "_blocks"], tensors[name + "_scales"] = packed(
            rng, (experts, d_out, d_in // 32))
    (path / "mxfp4").mkdir()
    safetensors.numpy.save_file(tensors, path / "mxfp4" / "model.safetensors",
                                metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    (path / "mxfp4" / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(
        path / "mxfp4", quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32).eval()


def test_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    blocks, scales = packed(np.random.RandomState(1), (3, 40, 2))
    want = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales))
    got = mxfp4.dequantize(blocks, scales)
    assert got.shape == tuple(want.shape) == (3, 64, 40)
    np.testing.assert_array_equal(got.astype(np.float32), want.float().numpy())


def test_mxfp4_checkpoint_loads_with_transformers_logits(tmp_path):
    hf = mxfp4_checkpoint(tmp_path)
    ids, mask = hf_models.padded_batch()
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = jaxft.from_pretrained(tmp_path / "mxfp4")
    got = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)

    # exported, the experts are plain weights under their own names, and the config says so
    jaxft.save_pretrained(model, tmp_path / "out")
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert not [n for n in written if n.endswith(("_blocks", "_scales"))]
    np.testing.assert_array_equal(
        written["model.layers.1.mlp.experts.down_proj"],
        hf.model.layers[1].mlp.experts.down_proj.detach().numpy())
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_mxfp4_base_stays_packed_as_released_and_trains_lora(tmp_path):
    """`quantize="mxfp4"` (`lora.base_quant=mxfp4`) keeps the experts in the checkpoint's own
    codes and scales, 4.25 bits a weight, with transformers' logits; adapters on the experts
    train against it, and merging writes transformers' dequantized weights plus the adapters."""
    from flax import nnx

    from jaxft import lora, quant

    hf = mxfp4_checkpoint(tmp_path)
    model = jaxft.from_pretrained(tmp_path / "mxfp4", quantize="mxfp4")
    released = safetensors.numpy.load_file(tmp_path / "mxfp4" / "model.safetensors")
    for name in EXPERT_WEIGHTS:
        packed = getattr(model.model.layers.mlp.experts, name.rsplit(".", 1)[1])
        for layer in range(2):
            blocks = released[f"model.layers.{layer}.{name}_blocks"]  # E out G 16
            scales = released[f"model.layers.{layer}.{name}_scales"]  # E out G
            experts, d_out = blocks.shape[:2]
            np.testing.assert_array_equal(
                np.asarray(packed.codes[...][layer]),
                blocks.reshape(experts, d_out, -1).transpose(0, 2, 1))
            np.testing.assert_array_equal(np.asarray(packed.scales[...][layer]),
                                          scales.transpose(0, 2, 1))
    packed_bytes, packed_params = quant.packed_size(model)
    assert packed_bytes * 8 / packed_params == 4.25
    assert not model.model.layers.self_attn.q_proj.packed  # attention stays as released

    ids, mask = hf_models.padded_batch()
    real = mask.astype(bool)
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids, mask))[real], want[real], atol=1e-4, rtol=0)

    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",),
                                           target_parameters=EXPERT_WEIGHTS))
    grads = nnx.grad(lambda m: (m(ids, mask) ** 2).mean(),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    experts = grads["model"]["layers"]["mlp"]["experts"]
    assert float(np.abs(experts["down_proj_adapter"]["lora_b"][...]).max()) > 0
    adapter = model.model.layers.mlp.experts.down_proj_adapter
    adapter.lora_b[...] = jnp.full(adapter.lora_b.shape, 0.01)
    lora.merge_lora(model)
    merged = model.model.layers.mlp.experts.down_proj[...]
    np.testing.assert_allclose(
        np.asarray(merged[1]), hf.model.layers[1].mlp.experts.down_proj.detach().numpy()
        + np.asarray(adapter.delta()[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("drop", ["model.layers.1.mlp.experts.down_proj_scales",
                                  "model.layers.0.mlp.experts.gate_up_proj_blocks"])
def test_mxfp4_tensor_without_its_partner_is_named(drop, tmp_path):
    mxfp4_checkpoint(tmp_path)
    file = tmp_path / "mxfp4" / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    del tensors[drop]
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(JaxftError) as err:
        jaxft.from_pretrained(tmp_path / "mxfp4")
    kept = drop.replace("_scales", "_blocks") if drop.endswith("_scales") else \
        drop.replace("_blocks", "_scales")
    assert f"MXFP4 tensor {kept} has no {drop}" in str(err.value)
