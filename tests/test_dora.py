"""DoRA (PEFT's `use_dora`) both ways: PEFT adapters import with PyTorch's logits, jaxft's export
loads in PEFT with jaxft's logits, merging equals PEFT's, and a quantized base works under it.

PEFT's own DoRA adapter starts with magnitudes equal to the adapted weight's norms, which makes
the magnitude invisible in the logits; every adapter here has its magnitudes moved off them, as
training does, so a wrong rescaling cannot pass.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxft
from jaxft import lora
from jaxft.errors import JaxftError
from jaxft.hf import adapters
from tests import hf_models

CASES = {  # name -> (HF config, PEFT LoraConfig kwargs)
    "llama_all_linear_gqa": (hf_models.CAUSAL_CONFIGS["llama_gqa_untied_llama3_rope"],
                             dict(target_modules="all-linear")),
    "qwen2_bias_rslora": (hf_models.CAUSAL_CONFIGS["qwen2_bias_tied"],
                          dict(target_modules=["q_proj", "v_proj", "down_proj"],
                               use_rslora=True)),
    "gpt2_conv1d": (hf_models.CAUSAL_CONFIGS["gpt2"],
                    dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def moved_magnitudes(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def jaxft_logits(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def assert_close(ours, theirs, mask):
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(CASES))
def dora_pair(request, tmp_path_factory):
    """(base dir, PEFT DoRA adapter dir, the PEFT model in eval mode)."""
    make_config, kwargs = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_models.build(make_config()).save_pretrained(root / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(hf_models.build(make_config()), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **kwargs))
    moved_magnitudes(model)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", model.eval()


def test_peft_dora_adapter_imports_with_pytorchs_logits(dora_pair):
    base, adapter, peft_model = dora_pair
    ids, mask = hf_models.padded_batch()
    model = jaxft.from_pretrained(base, adapter=adapter)
    assert all(a.magnitude is not None for a in adapters._adapted(model).values())
    assert_close(jaxft_logits(model, ids, mask), torch_logits(peft_model, ids, mask), mask)


@pytest.mark.slow
def test_merged_dora_equals_peft_merge_and_unload(dora_pair):
    base, adapter, _ = dora_pair
    ids, mask = hf_models.padded_batch()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged_by_peft = peft.PeftModel.from_pretrained(fresh, adapter).merge_and_unload().eval()
    model = lora.merge_lora(jaxft.from_pretrained(base, adapter=adapter))
    assert_close(jaxft_logits(model, ids, mask), torch_logits(merged_by_peft, ids, mask), mask)


def test_jaxft_dora_exports_as_a_peft_adapter(tmp_path):
    """jaxft's own DoRA (magnitudes from ‖W‖, then moved, B random): PEFT loads it and gives
    jaxft's logits; reloading the export into jaxft gives the same tensors back."""
    config = hf_models.CAUSAL_CONFIGS["llama"]()
    hf_models.build(config).save_pretrained(tmp_path / "base")
    model = jaxft.from_pretrained(tmp_path / "base")
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"),
                          use_dora=True)
    lora.apply_lora(model, cfg, seed=5)
    rng = np.random.RandomState(0)
    for adapter in adapters._adapted(model).values():
        adapter.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, adapter.lora_b.shape), jnp.float32)
        adapter.magnitude[...] = adapter.magnitude[...] * jnp.asarray(
            1 + 0.2 * rng.standard_normal(adapter.magnitude.shape), jnp.float32)
    adapters.save_peft_adapter(model, cfg, tmp_path / "adapter", base_name=str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / adapters.CONFIG_NAME).read_text())["use_dora"]

    ids, mask = hf_models.padded_batch()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                              dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ours = jaxft_logits(model, ids, mask)
    assert_close(ours, torch_logits(peft_model, ids, mask), mask)
    reloaded = jaxft.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    for (path, a), b in zip(adapters._adapted(model).items(),
                            adapters._adapted(reloaded).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a.magnitude[...]), np.asarray(b.magnitude[...]),
                                      err_msg=path)


def test_dora_on_an_nf4_base_equals_peft_on_bitsandbytes(tmp_path):
    import bitsandbytes as bnb

    config = hf_models.llama_config(intermediate_size=128)
    base = hf_models.build(config)
    base.save_pretrained(tmp_path / "base")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(quantized, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False))
    moved_magnitudes(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    for module in peft_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # its CPU inference kernel is bfloat16
    ids, mask = hf_models.padded_batch()
    model = jaxft.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter",
                                  quantize="nf4")
    assert model.model.layers.self_attn.q_proj.packed
    assert_close(jaxft_logits(model, ids, mask), torch_logits(peft_model.eval(), ids, mask), mask)


def test_magnitudes_without_use_dora_are_refused_by_name(dora_pair, tmp_path):
    _, adapter, _ = dora_pair
    base = dora_pair[0]
    copy = tmp_path / "adapter"
    copy.mkdir()
    config = json.loads((adapter / adapters.CONFIG_NAME).read_text())
    (copy / adapters.CONFIG_NAME).write_text(json.dumps({**config, "use_dora": False}))
    (copy / adapters.WEIGHTS_NAME).write_bytes((adapter / adapters.WEIGHTS_NAME).read_bytes())
    with pytest.raises(JaxftError, match=r"lora_magnitude_vector is a DoRA magnitude, but the "
                                         r"adapter's config has no use_dora"):
        jaxft.from_pretrained(base, adapter=copy)


@pytest.mark.slow
def test_dora_run_trains_and_exports_for_peft(tmp_path):
    """`lora.use_dora=True` through jaxft.train: the eval loss falls, and the exported adapter
    loads in PEFT with the run's own logits."""
    from jaxft import export, train
    from tests.tiny_run import tiny_config, tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "lora.use_dora": True, "train.steps": 6, "train.eval_every": 6})
    metrics = train.run(cfg)
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.01
    export.export_workdir(tmp_path / "run", tmp_path / "adapter")

    vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    ids, mask = hf_models.padded_batch(vocab=vocab)
    run = export.load_run(tmp_path / "run")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].use_dora
    assert_close(jaxft_logits(run.model, ids, mask), torch_logits(peft_model, ids, mask), mask)
