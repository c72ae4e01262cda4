"""Import: adapters made by real PEFT in PyTorch load into jaxft with PyTorch's logits.

Each adapter comes from `peft.get_peft_model(..., init_lora_weights=False)`, so B is random and
non-zero and every factor moves the logits. Re-exporting an imported adapter gives PEFT's own
tensors back, byte for byte.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxft
from jaxft import lora
from jaxft.hf import adapters
from tests import hf_models
from tests.test_models import torch_logits

CAUSAL = transformers.AutoModelForCausalLM
SEQ_CLS = transformers.AutoModelForSequenceClassification

# name -> (HF config, transformers class, PEFT LoraConfig kwargs, jaxft.from_pretrained kwargs)
CASES = {
    "llama_qv": (hf_models.CAUSAL_CONFIGS["llama"], CAUSAL,
                 dict(target_modules=["q_proj", "v_proj"]), {}),
    "llama_mlp_rslora_patterns": (
        hf_models.CAUSAL_CONFIGS["llama"], CAUSAL,
        dict(target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True,
             rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 5}), {}),
    "llama_all_linear_untied": (hf_models.CAUSAL_CONFIGS["llama_gqa_untied_llama3_rope"], CAUSAL,
                                dict(target_modules="all-linear"), {}),
    "llama_all_linear_exclude": (hf_models.CAUSAL_CONFIGS["llama"], CAUSAL,
                                 dict(target_modules="all-linear",
                                      exclude_modules=["up_proj", "o_proj"]), {}),
    "mistral_regex_ko": (hf_models.CAUSAL_CONFIGS["mistral_gqa"], CAUSAL,
                         dict(target_modules=r"model\.layers\.\d+\.self_attn\.(k|o)_proj"), {}),
    "qwen2_bias_tied": (hf_models.CAUSAL_CONFIGS["qwen2_bias_tied"], CAUSAL,
                        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), {}),
    "gpt2_c_attn": (hf_models.CAUSAL_CONFIGS["gpt2"], CAUSAL,
                    dict(target_modules=["c_attn"], fan_in_fan_out=True), {}),
    "gpt2_mlp": (hf_models.CAUSAL_CONFIGS["gpt2"], CAUSAL,
                 dict(target_modules=["c_fc", "mlp.c_proj"], fan_in_fan_out=True), {}),
    "qwen3_all_linear": (hf_models.CAUSAL_CONFIGS["qwen3_qk_norm_mixed_window"], CAUSAL,
                         dict(target_modules="all-linear"), {}),
    "phi3_fused": (hf_models.CAUSAL_CONFIGS["phi3_longrope_window"], CAUSAL,
                   dict(target_modules=["qkv_proj", "gate_up_proj"]), {}),
    "gemma2_all_linear": (hf_models.CAUSAL_CONFIGS["gemma2_softcap_window"], CAUSAL,
                          dict(target_modules="all-linear"), {}),
    "gemma3_qv_down": (hf_models.CAUSAL_CONFIGS["gemma3_local_global_rope"], CAUSAL,
                       dict(target_modules=["q_proj", "v_proj", "down_proj"]), {}),
    "bert_seq_cls": (lambda: hf_models.bert_config(num_labels=3), SEQ_CLS,
                     dict(target_modules=["query", "value", "intermediate.dense"],
                          task_type="SEQ_CLS"), dict(num_labels=3)),
}


def jaxft_out(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def real(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token outputs at real positions only (HF leaves padding unspecified)."""
    return out[mask == 1] if out.ndim == 3 else out


def assert_close(got: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> None:
    np.testing.assert_allclose(real(got, mask), real(expected, mask), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def made_in_pytorch(tmp_path_factory):
    """name -> (base dir, adapter dir, PyTorch PEFT outputs, base outputs) for every case."""
    made = {}
    ids, mask = hf_models.padded_batch()
    for name, (config, cls, lora_kw, _) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        hf = hf_models.build(config(), cls=cls)
        hf.save_pretrained(root / "base")
        base_out = torch_logits(hf, ids, mask)
        torch.manual_seed(1)
        lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                   **{"task_type": "CAUSAL_LM", **lora_kw})
        model = peft.get_peft_model(hf, lora_cfg).eval()
        model.save_pretrained(root / "adapter")
        made[name] = (root / "base", root / "adapter", torch_logits(model, ids, mask), base_out)
    return made


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_loads_with_pytorch_logits(name, made_in_pytorch):
    base, adapter, expected, base_out = made_in_pytorch[name]
    ids, mask = hf_models.padded_batch()
    model = jaxft.from_pretrained(base, adapter=adapter, **CASES[name][3])
    got = jaxft_out(model, ids, mask)
    assert_close(got, expected, mask)
    assert np.abs(real(expected - base_out, mask)).max() > 5e-3  # 50x the tolerance: it matters


@pytest.mark.parametrize("name", sorted(CASES))
def test_reexport_gives_peft_tensors_back(name, made_in_pytorch, tmp_path):
    """PEFT -> jaxft -> PEFT keeps every tensor bit for bit; jaxft -> jaxft is a fixed point."""
    base, adapter, _, _ = made_in_pytorch[name]
    model = jaxft.from_pretrained(base, **CASES[name][3])
    cfg = adapters.load_peft_adapter(model, adapter)
    adapters.save_peft_adapter(model, cfg, tmp_path / "once", base_name=str(base))
    original, once = load_file(adapter / adapters.WEIGHTS_NAME), load_file(
        tmp_path / "once" / adapters.WEIGHTS_NAME)
    extra = set(once) - set(original)  # a task head jaxft always carries (BERT's pooler)
    assert set(original) <= set(once) and all(".lora_" not in k for k in extra)
    for key, value in original.items():
        assert once[key].dtype == value.dtype and once[key].tobytes() == value.tobytes(), key

    again = jaxft.from_pretrained(base, adapter=tmp_path / "once", **CASES[name][3])
    cfg_again = adapters.load_peft_adapter(jaxft.from_pretrained(base, **CASES[name][3]),
                                           tmp_path / "once")
    adapters.save_peft_adapter(again, cfg_again, tmp_path / "twice", base_name=str(base))
    twice = load_file(tmp_path / "twice" / adapters.WEIGHTS_NAME)
    assert set(twice) == set(once)
    assert all(twice[k].tobytes() == once[k].tobytes() for k in once)
    saved = [json.loads((d / adapters.CONFIG_NAME).read_text()) for d in
             (tmp_path / "once", tmp_path / "twice")]
    assert saved[0] == saved[1]


def test_rslora_and_patterns_survive_the_round_trip(made_in_pytorch, tmp_path):
    base, adapter, _, _ = made_in_pytorch["llama_mlp_rslora_patterns"]
    model = jaxft.from_pretrained(base)
    cfg = adapters.load_peft_adapter(model, adapter)
    mlp = model.model.layers.mlp
    assert mlp.down_proj.adapter.lora_a.shape == (2, 96, 2)  # layers, in, r from rank_pattern
    assert mlp.up_proj.adapter.scale == pytest.approx(5 / 4**0.5)  # alpha_pattern, rsLoRA
    assert mlp.gate_proj.adapter.scale == pytest.approx(8 / 4**0.5)
    adapters.save_peft_adapter(model, cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / adapters.CONFIG_NAME).read_text())
    assert written["use_rslora"] is True
    assert written["rank_pattern"] == {"down_proj": 2}
    assert written["alpha_pattern"] == {"up_proj": 5}
    assert written["target_modules"] == ["down_proj", "gate_proj", "up_proj"]


# ------------------------------------------------------------------------------------------------
# Adapters that do not fit: one line each, naming the culprit
# ------------------------------------------------------------------------------------------------


def _edit_config(made_in_pytorch, tmp_path, name: str = "llama_qv", **changes):
    import shutil

    base, adapter, _, _ = made_in_pytorch[name]
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / adapters.CONFIG_NAME).read_text())
    config.update(changes)
    (copy / adapters.CONFIG_NAME).write_text(json.dumps(config))
    return base, copy


@pytest.mark.parametrize("option, value, message", [
    ("use_dora", True, "missing tensor base_model.model.model.layers.0.self_attn.q_proj."
                       "lora_magnitude_vector"),  # DoRA without its magnitudes
    ("layer_replication", [[0, 2]], "layer_replication=[[0, 2]] (layer replication)"),
    ("bias", "all", "bias='all' is not supported"),
    ("layers_to_transform", [0], "layers_to_transform=[0] (adapters on some layers only)"),
    ("lora_bias", True, "lora_bias=True"),
    ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
])
def test_unsupported_options_are_refused_by_name(option, value, message, made_in_pytorch,
                                                 tmp_path):
    base, adapter = _edit_config(made_in_pytorch, tmp_path, **{option: value})
    with pytest.raises(jaxft.JaxftError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")) as e:
        jaxft.from_pretrained(base, adapter=adapter)
    assert "\n" not in str(e.value)


def test_init_options_are_irrelevant_on_load(made_in_pytorch, tmp_path):
    base, adapter = _edit_config(made_in_pytorch, tmp_path, init_lora_weights="pissa",
                                 loftq_config={"loftq_bits": 4})
    ids, mask = hf_models.padded_batch()
    assert_close(jaxft_out(jaxft.from_pretrained(base, adapter=adapter), ids, mask),
                 made_in_pytorch["llama_qv"][2], mask)


def test_target_that_base_lacks(made_in_pytorch, tmp_path):
    base, adapter = _edit_config(made_in_pytorch, tmp_path, target_modules=["c_attn"])
    with pytest.raises(jaxft.JaxftError, match=r"target_modules \['c_attn'\] match no projection "
                       r"of this llama model \(its projections: down_proj, gate_proj, "):
        jaxft.from_pretrained(base, adapter=adapter)


def test_tensors_for_modules_target_modules_do_not_select(made_in_pytorch, tmp_path):
    base, adapter = _edit_config(made_in_pytorch, tmp_path, target_modules=["q_proj"])
    with pytest.raises(jaxft.JaxftError, match=r"tensor base_model\.model\.model\.layers\.0\."
                       r"self_attn\.v_proj\.lora_A\.weight: target_modules do not select"):
        jaxft.from_pretrained(base, adapter=adapter)


def test_adapter_for_another_family_names_its_module(made_in_pytorch):
    _, gpt2_adapter, _, _ = made_in_pytorch["gpt2_c_attn"]
    llama_base = made_in_pytorch["llama_qv"][0]
    with pytest.raises(jaxft.JaxftError, match="match no projection of this llama model"):
        jaxft.from_pretrained(llama_base, adapter=gpt2_adapter)


def test_shapes_that_do_not_fit_name_module_and_shapes(made_in_pytorch, tmp_path):
    """An adapter trained on a wider model: same names, other shapes."""
    wide = hf_models.build(hf_models.llama_config(hidden_size=32, num_attention_heads=2))
    model = peft.get_peft_model(wide, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(jaxft.JaxftError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\."
                       r"weight has shape \(4, 32\) but model\.layers\.0\.self_attn\.q_proj "
                       r"\(64 in, 64 out, r=4\) needs \(4, 64\)") as e:
        jaxft.from_pretrained(made_in_pytorch["llama_qv"][0], adapter=tmp_path / "wide")
    assert "\n" not in str(e.value)


def test_missing_layer_and_some_layers_only(made_in_pytorch, tmp_path):
    from safetensors.numpy import save_file

    base, adapter = _edit_config(made_in_pytorch, tmp_path)
    tensors = load_file(adapter / adapters.WEIGHTS_NAME)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(adapter / adapters.WEIGHTS_NAME))
    with pytest.raises(jaxft.JaxftError, match=r"missing tensor base_model\.model\.model\."
                       r"layers\.1\.self_attn\.q_proj\.lora_B\.weight"):
        jaxft.from_pretrained(base, adapter=adapter)

    base, adapter = _edit_config(made_in_pytorch, tmp_path / "b",
                                 target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    with pytest.raises(jaxft.JaxftError, match=r"select only layers \[0\] of model\.layers\."
                       r"\{L\}\.self_attn\.q_proj; jaxft adapts all layers"):
        jaxft.from_pretrained(base, adapter=adapter)


def test_classification_adapter_needs_a_classifier(made_in_pytorch, tmp_path):
    adapter = made_in_pytorch["bert_seq_cls"][1]
    base = tmp_path / "encoder"  # a bare BertModel checkpoint: no head unless asked for
    hf_models.build(hf_models.bert_config(), cls=transformers.BertModel).save_pretrained(base)
    with pytest.raises(jaxft.JaxftError, match="sequence-classification adapter needs a "
                       r"classifier base \(load it with num_labels="):
        jaxft.from_pretrained(base, adapter=adapter)
    with pytest.raises(jaxft.JaxftError, match=r"classifier\.weight has shape \(3, 64\) but "
                       r"the model expects \(2, 64\)"):
        jaxft.from_pretrained(base, adapter=adapter, num_labels=2)


def test_not_an_adapter_directory(made_in_pytorch, tmp_path):
    base = made_in_pytorch["llama_qv"][0]
    with pytest.raises(jaxft.JaxftError, match="no adapter_config.json"):
        jaxft.from_pretrained(base, adapter=base)
    base, adapter = _edit_config(made_in_pytorch, tmp_path)
    (adapter / adapters.WEIGHTS_NAME).unlink()
    with pytest.raises(jaxft.JaxftError, match="no adapter_model.safetensors"):
        jaxft.from_pretrained(base, adapter=adapter)


def test_model_is_untouched_when_the_adapter_is_refused(made_in_pytorch, tmp_path):
    base, adapter = _edit_config(made_in_pytorch, tmp_path, target_modules=["q_proj"])
    model = jaxft.from_pretrained(base)
    with pytest.raises(jaxft.JaxftError):
        adapters.load_peft_adapter(model, adapter)
    assert all(linear.adapter is None for _, linear in lora.linear_modules(model))
