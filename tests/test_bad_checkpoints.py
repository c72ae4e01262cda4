"""Each broken checkpoint ends in one clear line naming the culprit."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxft
from tests import hf_models


@pytest.fixture
def llama_dir(tmp_path):
    hf_models.build(hf_models.llama_config()).save_pretrained(tmp_path)
    return tmp_path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_directory_without_config(tmp_path):
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(tmp_path)
    assert one_line(e) == f"{tmp_path}: no config.json (expected a Hugging Face model directory)"


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(jaxft.JaxftError, match="no such file or directory"):
        jaxft.from_pretrained(tmp_path / "nope")


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained("some-org/some-model")
    assert one_line(e).startswith("some-org/some-model: not a local path, and the hub download")


def test_a_hub_that_cannot_be_reached_is_said_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE, a host that does not resolve is named, and only the local cache
    is asked (huggingface_hub's own path retries for half a minute and names neither)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained("some-org/some-model")
    assert one_line(e) == (
        "some-org/some-model: not a local path, and the hub download failed: the hub "
        "(hub.invalid) cannot be reached from this machine and the model is not in the local "
        "cache; download it where there is a network, or pass a local directory")


def test_unsupported_model_type(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["model_type"] = "t5"
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(llama_dir)
    assert one_line(e) == (
        f"{llama_dir / 'config.json'}: model_type 't5' is not supported "
        "(supported: llama, mistral, qwen2, qwen3, phi3, qwen3_moe, mixtral, gpt_oss, gemma, "
        "gemma2, gemma3_text, gpt2, bert)"
    )


@pytest.mark.parametrize("config, says", [
    (lambda: __import__("transformers").Gemma3Config(),
     "model_type 'gemma3' is a multimodal Gemma 3 (vision tower and text model; load a "
     "text-only gemma3_text checkpoint"),
    (lambda: __import__("transformers").Qwen2MoeConfig(),
     "model_type 'qwen2_moe' is a mixture-of-experts Qwen2 (jaxft loads the dense qwen2 "
     "models), which jaxft does not load (supported: llama"),
])
def test_near_miss_variants_say_what_they_are(config, says, tmp_path):
    """A config.json alone (transformers' own, for a model jaxft does not load) is refused
    before any weights are looked for, naming the variant and what to load instead."""
    config().save_pretrained(tmp_path)
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(tmp_path)
    assert says in one_line(e)


def test_phi3_with_llama_target_names_lists_its_own(tmp_path):
    from jaxft import lora

    hf_models.build(hf_models.CAUSAL_CONFIGS["phi3_longrope_window"]()).save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    with pytest.raises(jaxft.JaxftError) as e:
        lora.apply_lora(model, lora.LoraConfig(targets=("q_proj", "v_proj", "o_proj")))
    assert one_line(e) == ("lora target 'q_proj' matches no module of this phi3 model (its "
                           "projections: down_proj, gate_up_proj, lm_head, o_proj, qkv_proj; or "
                           "'all-linear')")


def test_missing_tensor_is_named(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(llama_dir)
    assert one_line(e) == f"{llama_dir}: missing tensor model.layers.1.mlp.up_proj.weight"


def test_wrong_shape_names_both_shapes(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(llama_dir)
    assert one_line(e) == (
        f"{llama_dir}: tensor model.layers.0.self_attn.k_proj.weight has "
        "shape (32, 64) but the model expects (64, 64)"
    )


def test_missing_config_field(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    del config["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(llama_dir)
    assert one_line(e) == f"{llama_dir / 'config.json'}: missing field 'hidden_size'"


class Payload:
    """An object whose unpickling would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_bin_with_code_is_refused(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, llama_dir / "pytorch_model.bin")
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(llama_dir)
    assert one_line(e).startswith(
        f"{llama_dir / 'pytorch_model.bin'}: refused by torch.load(weights_only=True)"
    )


def test_directory_without_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(jaxft.JaxftError, match="no weights found"):
        jaxft.from_pretrained(llama_dir)
