"""A quantized base (QLoRA): NF4 and int8 against bitsandbytes itself, and PEFT on top of it.

bitsandbytes runs on this CPU. Its 4-bit quantizer is plain torch (the same on every device),
so jaxft's NF4 codes, block maxima and dequantized weights equal it bit for bit. Double
quantization leaves two things to the device (see `jaxft.quant.double_quantize`), and its test
bounds exactly those. bitsandbytes' CPU inference kernel for `Linear4bit` computes in bfloat16
on AVX512-BF16 CPUs; the PEFT comparison turns it off so that float32 meets float32.
"""

from __future__ import annotations

import re
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import jaxft
from jaxft import config as config_lib
from jaxft import quant, spec
from jaxft.errors import JaxftError
from jaxft.hf.model import ModelOptions, blueprint
from tests import hf_models

SHAPES = [(96, 128), (1000, 64), (64, 4096)]  # Hugging Face [out, in]


def weight(shape, seed=0, dtype=np.float32) -> np.ndarray:
    w = np.random.RandomState(seed).standard_t(5, size=shape) * 0.02  # heavy tails, as LLMs
    return w.astype(dtype)


def nf4_module(kernel: np.ndarray, cfg: quant.QuantConfig) -> quant.NF4Weight:
    """jaxft's packed weight for a jaxft-layout kernel [in, out], filled by its own encoder."""
    module = quant.NF4Weight(kernel.shape, (None, None), kernel.dtype, cfg)
    for name, value in quant.NF4Weight.encode(kernel, cfg).items():
        getattr(module, name)[...] = jnp.asarray(value)
    return module


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nf4_equals_bitsandbytes_bit_for_bit(shape, dtype):
    torch_dtype = getattr(torch, dtype)
    w = torch.from_numpy(weight(shape)).to(torch_dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state)  # in the weight's dtype, as Linear4bit uses

    kernel = w.float().numpy().T.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    cfg = quant.QuantConfig(quant.NF4, 64)
    arrays = quant.NF4Weight.encode(kernel, cfg)
    np.testing.assert_array_equal(arrays["codes"].T.reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(arrays["absmax"].T.reshape(-1), state.absmax.numpy())
    ours = np.asarray(nf4_module(kernel, cfg).dequantize().astype(jnp.float32)).T
    np.testing.assert_array_equal(ours, expected.float().numpy())


@pytest.mark.parametrize("shape", [(96, 48), (40, 100), (7, 96), (3, 2304)])
@pytest.mark.parametrize("block", [64, 512])
def test_nf4_of_any_even_width_equals_bitsandbytes(shape, block):
    """Widths the block does not divide (a hidden size of 48 with blocks of 64, Gemma-2-2b's
    2304 with 512): bitsandbytes' blocks run over the flattened rows and straddle them; jaxft's
    are the same blocks, codes and maxima, and its weights are those of bitsandbytes' own
    device-independent dequantizer, bit for bit. (bitsandbytes' CPU kernel, which its generic
    path stands in for on odd shapes, indexes blocks per row and disagrees with its own
    quantizer on these widths, so it is not the reference.)"""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    w = torch.from_numpy(weight(shape, seed=3))
    packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4")
    cfg = quant.QuantConfig(quant.NF4, block)
    kernel = w.numpy().T
    arrays = quant.NF4Weight.encode(kernel, cfg)
    np.testing.assert_array_equal(arrays["codes"].T.reshape(-1), packed.numpy().reshape(-1))
    absmax = arrays["absmax"] if arrays["absmax"].ndim == 1 else arrays["absmax"].T.reshape(-1)
    np.testing.assert_array_equal(absmax, state.absmax.numpy())
    ours = np.asarray(nf4_module(kernel, cfg).dequantize().astype(jnp.float32)).T
    expected = _dequantize_4bit_compute(packed.reshape(-1), state.absmax,
                                        _get_4bit_code("nf4", packed.device), block, state.shape,
                                        state.dtype)
    np.testing.assert_array_equal(ours, expected.numpy())


def test_an_odd_width_is_refused_in_one_line(tmp_path):
    hf_models.build(hf_models.llama_config(intermediate_size=97)).save_pretrained(tmp_path)
    with pytest.raises(JaxftError, match=r"^lora.base_quant nf4: model.layers.mlp.down_proj has "
                       r"97 inputs, an odd number, .*use lora.base_quant=int8"):
        jaxft.from_pretrained(tmp_path, quantize="nf4")


def test_double_quantization_differs_from_bitsandbytes_only_where_documented():
    w = torch.from_numpy(weight((512, 320), seed=1))
    _, single = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    _, double = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(quant.DYNAMIC_CODE, double.state2.code.numpy())

    # jaxft's offset is the correctly rounded mean; bitsandbytes' is torch's float32 sum order.
    arrays = quant.NF4Weight.encode(w.numpy().T, quant.QuantConfig(quant.NF4, 64, True))
    assert abs(arrays["absmax_offset"] - double.offset.item()) <= np.spacing(np.float32(
        double.offset.item()))

    # Given bitsandbytes' own offset, the 256-block maxima are its own, and a code differs only
    # by one step, only within bitsandbytes' CPU tolerance (2e-5) of a midpoint between codes.
    codes, scales = quant.double_quantize(single.absmax.numpy(), double.offset.numpy())
    np.testing.assert_array_equal(scales, double.state2.absmax.numpy())
    theirs = double.absmax.numpy()
    differ = np.nonzero(codes != theirs)[0]
    assert len(differ) <= len(codes) // 100
    normed = (single.absmax.numpy() - double.offset.numpy()) / np.repeat(scales, 256)[:len(codes)]
    midpoints = (quant.DYNAMIC_CODE[:-1] + quant.DYNAMIC_CODE[1:]) / 2
    for i in differ:
        assert abs(int(codes[i]) - int(theirs[i])) == 1
        between = midpoints[min(codes[i], theirs[i])]
        assert abs(normed[i] - between) <= 2e-5, (i, normed[i], between)

    # So the dequantized weights: where a block's maximum is bitsandbytes' own, the block is
    # too; elsewhere a weight moves by at most its block maximum's difference (|NF4| <= 1).
    ours = np.asarray(nf4_module(w.numpy().T, quant.QuantConfig(quant.NF4, 64, True))
                      .dequantize()).T.reshape(-1, 64)
    expected = bnbf.dequantize_4bit(*bnbf.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True)).numpy().reshape(-1, 64)
    block_gap = np.abs(np.asarray(nf4_module(w.numpy().T, quant.QuantConfig(
        quant.NF4, 64, True)).block_maxima()).T.reshape(-1) - (bnbf.dequantize_blockwise(
            double.absmax, double.state2).numpy() + double.offset.item()))
    np.testing.assert_array_equal(ours[block_gap == 0], expected[block_gap == 0])
    assert np.all(np.abs(ours - expected) <= block_gap[:, None] * (1 + 1e-6))
    assert np.mean(block_gap > 1e-6 * np.abs(single.absmax.numpy())) <= 0.01


def test_int8_equals_bitsandbytes_vectorwise_quantization():
    w = torch.from_numpy(weight((96, 128), seed=2))
    values, absmax, _ = bnbf.int8_vectorwise_quant(w.clone())
    arrays = quant.Int8Weight.encode(w.numpy().T, quant.QuantConfig(quant.INT8))
    np.testing.assert_array_equal(arrays["values"].T, values.numpy())
    np.testing.assert_array_equal(arrays["absmax"], absmax.numpy())
    module = quant.Int8Weight((128, 96), (None, None), jnp.float32, quant.QuantConfig(quant.INT8))
    for name, value in arrays.items():
        getattr(module, name)[...] = jnp.asarray(value)
    np.testing.assert_array_equal(np.asarray(module.dequantize()).T,
                                  bnbf.int8_vectorwise_dequant(values, absmax).numpy())


@pytest.fixture(scope="module")
def qlora_pair(tmp_path_factory):
    """A tiny Llama (every projection's input a multiple of 64) with a PEFT adapter on all
    linear layers, B random, trained-looking: (base dir, adapter dir)."""
    root = tmp_path_factory.mktemp("qlora")
    config = hf_models.llama_config(intermediate_size=128, num_key_value_heads=2)
    base = hf_models.build(config)
    base.save_pretrained(root / "base")
    torch.manual_seed(1)
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                               init_lora_weights=False)
    peft.get_peft_model(base, lora_cfg).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def bnb_peft_logits(base_dir, adapter_dir, ids, mask, double_quant: bool) -> np.ndarray:
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=double_quant))
    model = peft.PeftModel.from_pretrained(quantized, adapter_dir).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # its CPU inference kernel is bfloat16
    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("double_quant", [False])
def test_qlora_logits_equal_peft_on_bitsandbytes(qlora_pair, double_quant):
    base_dir, adapter_dir = qlora_pair
    ids, mask = hf_models.padded_batch()
    expected = bnb_peft_logits(base_dir, adapter_dir, ids, mask, double_quant)
    model = jaxft.from_pretrained(base_dir, adapter=adapter_dir, quantize=quant.QuantConfig(
        quant.NF4, 64, double_quant))
    assert type(model.model.layers.mlp.down_proj.kernel) is quant.NF4Weight
    assert not model.lm_head.packed  # as bitsandbytes, the head stays in its dtype
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    # Same weights to the bit, float32 matmuls in another order: 1e-4 as every logits test.
    # (With double quantization a block maximum in a hundred may sit one 8-bit code apart, so
    # the weights are not bitsandbytes' to the bit: the test above bounds exactly that.)
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


LLAMA_2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("double_quant, at_most", [(False, 0.5625), (True, 0.5159)])
def test_nf4_base_costs_at_most_057_bytes_per_projection_parameter(double_quant, at_most):
    abstract = blueprint(LLAMA_2_7B, "Llama-2-7b", ModelOptions(
        param_dtype="bfloat16", compute_dtype="bfloat16", remat="full", attention="xla",
        quantize=quant.QuantConfig(quant.NF4, 64, double_quant))).abstract()
    packed_bytes, packed_params = quant.packed_size(abstract)
    assert packed_params == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert packed_bytes / packed_params <= at_most
    dense = sum(x.size * 2 for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    whole_base = packed_bytes + dense  # embeddings, head and norms stay bfloat16
    assert 3.5 * 2**30 < whole_base < 3.9 * 2**30  # about 4 GiB, against 12.55 GiB in bf16


@pytest.mark.parametrize("override, message", [
    ({"lora.enabled": False, "lora.base_quant": "nf4"}, "lora.base_quant='nf4' needs lora.enabled"),
    ({"lora.base_quant": "fp4"}, "lora.base_quant 'fp4' unknown (known: none, nf4, int8, mxfp4)"),
    ({"lora.base_quant": "nf4", "lora.quant_block_size": 48}, "lora.quant_block_size must be"),
    ({"lora.base_quant": "int8", "lora.double_quant": True},
     "lora.double_quant applies to nf4, not int8"),
])
def test_bad_quantization_settings_are_one_line(override, message):
    c = config_lib.base_config()
    c.model.path, c.data.train_path = "m", "d.jsonl"
    for dotted, value in override.items():
        section, field = dotted.split(".")
        c[section][field] = value
    with pytest.raises(JaxftError, match="^config: " + message.replace("(", r"\(").replace(
            ")", r"\)")):
        spec.validate(c, device_count=1, platform="cpu")


@pytest.mark.slow
def test_qlora_run_learns_and_exports_for_peft_and_transformers(tmp_path):
    """A jaxft.train QLoRA run: its eval loss falls; the adapter loads in PEFT on the float
    base; the merged export (adapters folded into the dequantized base) reloads in
    transformers with the logits of jaxft's own quantized model."""
    from jaxft import export, train
    from tests.tiny_run import tiny_config, tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model", intermediate_size=128)
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "lora.base_quant": "nf4", "lora.double_quant": True, "lora.targets": "all-linear",
        "train.steps": 8, "train.eval_every": 8})
    metrics = train.run(cfg)
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.01

    vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    ids, mask = hf_models.padded_batch(vocab=vocab)
    real = mask.astype(bool)
    run = export.load_run(tmp_path / "run")
    assert type(run.model.model.layers.self_attn.q_proj.kernel) is quant.NF4Weight
    trained = np.asarray(run.model(jnp.asarray(ids), jnp.asarray(mask)))

    export.export_workdir(tmp_path / "run", tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    on_float_base = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    float_jaxft = jaxft.from_pretrained(model_dir, adapter=tmp_path / "adapter")
    with torch.no_grad():
        peft_logits = on_float_base(torch.from_numpy(ids),
                                    attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(peft_logits[real], np.asarray(float_jaxft(
        jnp.asarray(ids), jnp.asarray(mask)))[real], atol=1e-4, rtol=0)

    export.export_workdir(tmp_path / "run", tmp_path / "merged", merged=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(torch.from_numpy(ids),
                               attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(merged_logits[real], trained[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_qlora_recipe_learns_on_the_bundled_smollm2(tmp_path):
    """configs/qlora.py is configs/lora.py on an NF4 base, and on the real SmolLM2 and chat data
    its eval loss falls within a few steps (the README states both recipes' full runs)."""
    import importlib.util

    from tests.real_weights import package_dir, smollm2_gguf_path
    from tests.tiny_run import REPO, subprocess_env

    smollm2_gguf_path()
    package_dir("chatterbot_corpus")

    def recipe(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()

    qlora, plain = recipe("qlora"), recipe("lora")
    differ = {k for k in ("workdir", "lora") if qlora[k] != plain[k]}
    assert differ == {"workdir", "lora"}
    assert {k: v for k, v in qlora.lora.items() if plain.lora[k] != v} == {
        "base_quant": "nf4", "double_quant": True}

    # The recipe as a user runs it (one device, as on a laptop), only shorter.
    done = subprocess.run(
        [sys.executable, "-m", "jaxft.train", "--config=configs/qlora.py",
         f"--config.workdir={tmp_path / 'run'}", "--config.train.steps=5",
         "--config.train.eval_every=5", "--config.train.eval_batches=2",
         "--config.train.sample_prompts=", "--config.checkpoint.every=0"],
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, check=True).stdout
    final = re.search(r"eval_loss ([\d.]+), .*base_eval_loss ([\d.]+)", done.splitlines()[-1])
    assert float(final.group(1)) < float(final.group(2)) - 0.1, done.splitlines()[-1]


def test_quantizing_a_loaded_model_equals_quantizing_while_loading(qlora_pair):
    base_dir, _ = qlora_pair
    cfg = quant.QuantConfig(quant.NF4, 64, True)
    streamed = dict(nnx.to_flat_state(nnx.state(
        jaxft.from_pretrained(base_dir, quantize=cfg), quant.Quantized)))
    afterwards = dict(nnx.to_flat_state(nnx.state(
        quant.quantize_model(jaxft.from_pretrained(base_dir), cfg), quant.Quantized)))
    # 7 projections, each codes, absmax and the double quantization's scale and offset
    assert streamed.keys() == afterwards.keys() and len(streamed) == 7 * 4
    for path, var in streamed.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      np.asarray(afterwards[path].get_value()), err_msg=str(path))
