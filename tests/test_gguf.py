"""jaxft.hf.gguf must hand back exactly what transformers' own GGUF loader produces.

The real check runs on SmolLM2-135M-Instruct (Q4_1/Q8_0, GQA, tied embeddings); a tiny file written
here covers what that one lacks: an untied `output.weight`, F16 storage, and the Q/K row permutation
checked against the unpermuted originals rather than against transformers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from jaxft.errors import JaxftError
from jaxft.hf.gguf import iter_gguf_tensors, read_gguf_config
from tests.real_weights import smollm2_gguf_path, smollm2_transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _load_transformers(path: str, model=None) -> tuple[dict[str, np.ndarray], object]:
    """transformers' state_dict (as numpy) and config for a GGUF file, the reference we match
    (`model`: transformers' model of that file, if already loaded)."""
    directory, name = os.path.split(path)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return state, transformers.AutoConfig.from_pretrained(directory, gguf_file=name)


def _assert_tensors_match(path: str, reference: dict[str, np.ndarray], tied: bool) -> None:
    ours = dict(iter_gguf_tensors(path))
    expected = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name, array in ours.items():
        assert array.dtype == np.float32 and array.flags.writeable, name
        assert array.shape == reference[name].shape, name
        assert np.array_equal(array, reference[name]), name


def _assert_config_matches(cfg: dict, reference) -> None:
    mine = transformers.LlamaConfig(**cfg)
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
    ]:
        assert getattr(mine, key) == getattr(reference, key), key
    assert mine.rope_parameters["rope_theta"] == reference.rope_parameters["rope_theta"]


# --- the real checkpoint -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, dict[str, np.ndarray], object]:
    path = smollm2_gguf_path()
    return (path, *_load_transformers(path, smollm2_transformers()))


@pytest.mark.slow
def test_smollm2_tensors_bitwise_equal_transformers(smollm2) -> None:
    path, state, _ = smollm2
    _assert_tensors_match(path, state, tied=True)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2) -> None:
    path, _, reference = smollm2
    cfg = read_gguf_config(path)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (30, 9)
    assert cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert "rope_scaling" not in cfg
    _assert_config_matches(cfg, reference)


# --- a tiny synthetic checkpoint ---------------------------------------------------------------

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 96, 64, 128, 4, 2, 2


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, the transform we must undo."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_llama(path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF; return the HF-layout originals of its unquantized tensors."""
    head_dim = HIDDEN // HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(VOCAB)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    originals = {"model.norm.weight": rand(HIDDEN)}
    embed = rand(VOCAB, HIDDEN).astype(np.float16)
    originals["model.embed_tokens.weight"] = embed.astype(np.float32)
    writer.add_tensor("token_embd.weight", embed)
    writer.add_tensor("output_norm.weight", originals["model.norm.weight"])
    q8 = gguf.quants.quantize(rand(VOCAB, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(LAYERS):
        layer = {
            "attn_norm": ("input_layernorm", rand(HIDDEN)),
            "ffn_norm": ("post_attention_layernorm", rand(HIDDEN)),
            "attn_q": ("self_attn.q_proj", rand(HEADS * head_dim, HIDDEN)),
            "attn_k": ("self_attn.k_proj", rand(KV_HEADS * head_dim, HIDDEN)),
            "attn_v": ("self_attn.v_proj", rand(KV_HEADS * head_dim, HIDDEN)),
            "attn_output": ("self_attn.o_proj", rand(HIDDEN, HEADS * head_dim)),
            "ffn_gate": ("mlp.gate_proj", rand(FFN, HIDDEN)),
            "ffn_up": ("mlp.up_proj", rand(FFN, HIDDEN)),
            "ffn_down": ("mlp.down_proj", rand(HIDDEN, FFN)),
        }
        for leaf, (hf_leaf, w) in layer.items():
            originals[f"model.layers.{i}.{hf_leaf}.weight"] = w
            stored = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(leaf)
            writer.add_tensor(
                f"blk.{i}.{leaf}.weight", w if stored is None else _llama_cpp_permute(w, stored)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def test_tiny_untied_llama_matches_originals_and_transformers(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    originals = _write_tiny_llama(path, np.random.default_rng(0))
    ours = dict(iter_gguf_tensors(path))
    for name, original in originals.items():  # Q/K permutation undone exactly, F16 widened
        assert np.array_equal(ours[name], original), name
    assert ours["lm_head.weight"].shape == (VOCAB, HIDDEN)

    cfg = read_gguf_config(path)
    assert cfg["tie_word_embeddings"] is False and "bos_token_id" not in cfg
    state, reference = _load_transformers(str(path))
    _assert_tensors_match(str(path), state, tied=False)
    _assert_config_matches(cfg, reference)


def test_rope_scaling_is_reported(tmp_path) -> None:
    path = tmp_path / "scaled.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (writer.add_block_count, 1),
        (writer.add_context_length, 8192),
        (writer.add_embedding_length, 32),
        (writer.add_feed_forward_length, 64),
        (writer.add_head_count, 2),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_vocab_size, 100),
        (writer.add_rope_scaling_type, gguf.RopeScalingType.LINEAR),
        (writer.add_rope_scaling_factor, 4.0),
        (writer.add_rope_scaling_orig_ctx_len, 2048),
    ]:
        add(value)
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = read_gguf_config(path)
    assert cfg["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    assert transformers.LlamaConfig(**cfg).rope_parameters["factor"] == 4.0


# --- errors ------------------------------------------------------------------------------------


def _write_minimal(path, arch: str, tensor: np.ndarray, **kwargs) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(8)
    writer.add_tensor("token_embd.weight", tensor, **kwargs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _one_line_error(call, *args) -> str:
    with pytest.raises(JaxftError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("call", [read_gguf_config, lambda p: list(iter_gguf_tensors(p))])
def test_missing_and_non_gguf_files(tmp_path, call) -> None:
    missing = tmp_path / "nope.gguf"
    assert str(missing) in _one_line_error(call, missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a gguf file" * 10)
    assert str(junk) in _one_line_error(call, junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\xff")
    assert str(truncated) in _one_line_error(call, truncated)


def test_unsupported_architecture(tmp_path) -> None:
    path = tmp_path / "bert.gguf"
    _write_minimal(path, "bert", np.zeros((8, 32), np.float32))
    message = _one_line_error(read_gguf_config, path)
    assert str(path) in message and "'bert'" in message and "llama" in message
    assert str(path) in _one_line_error(lambda p: next(iter_gguf_tensors(p)), path)


def test_undequantizable_tensor_type(tmp_path) -> None:
    path = tmp_path / "int.gguf"
    _write_minimal(path, "llama", np.zeros((8, 32), np.int32))
    message = _one_line_error(lambda p: list(iter_gguf_tensors(p)), path)
    assert "token_embd.weight" in message and "I32" in message


@pytest.mark.slow
def test_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, jaxft.hf.gguf; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
