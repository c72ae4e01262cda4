"""Read llama.cpp `.gguf` checkpoints as if they were Hugging Face checkpoint directories.

The rest of jaxft loads HF-named float tensors plus a `config.json`-style dict. A GGUF file holds
the same model under llama.cpp's names, quantized, with the rows of Q and K permuted for llama.cpp's
rotary layout. This module undoes all three, mirroring transformers' own GGUF loader
(`transformers.modeling_gguf_pytorch_utils`) so that every array is bitwise equal to what
`AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=torch.float32)` holds. It uses only
numpy and the `gguf` package: no torch, no transformers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from jaxft.errors import JaxftError

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names -> Hugging Face names (the `gguf` package's LLAMA table, inverted).
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp derives from the config (precomputed rotary tables); HF recomputes them.
_DERIVED = re.compile(r"(rope_freqs|blk\.\d+\.attn_rot_embd)\.weight")
_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")
_HF_NAME = re.compile(r"(?:model\.layers\.(\d+)\.)?([\w.]+)\.(weight|bias)")


def gguf_name(hf_name: str) -> tuple[str, str]:
    """(llama.cpp's name, its leaf such as 'attn_q') for a Hugging Face Llama tensor name: the
    same table as reading, backwards, so export and load cannot drift apart."""
    match = _HF_NAME.fullmatch(hf_name)
    block, leaf, kind = match.groups() if match else (None, None, None)
    table = _TOP_LEVEL if block is None else _PER_LAYER
    ours = next((g for g, h in table.items() if h == leaf), None)
    if ours is None:
        raise JaxftError(f"tensor {hf_name!r} has no llama.cpp name (expected a dense llama's)")
    return (ours if block is None else f"blk.{block}.{ours}") + f".{kind}", ours


def _open(path: str | os.PathLike) -> tuple[GGUFReader, str]:
    """The reader for a llama GGUF file; every way the file can be unusable is a one-line error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JaxftError(f"{path}: no such GGUF file (expected a llama.cpp .gguf checkpoint)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise JaxftError(f"{path}: not a GGUF file (expected the 'GGUF' magic bytes)")
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:  # unreadable, truncated or corrupt
        if isinstance(e, JaxftError):
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # keep the message on one line
        raise JaxftError(f"{path}: unreadable GGUF file ({reason})") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise JaxftError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(expected one of: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return reader, path


def read_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every `tokenizer.*` field of a GGUF file in full (vocabulary, merges, special-token ids,
    chat template), plus `general.architecture`: what a tokenizer is rebuilt from."""
    reader, _ = _open(path)
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str (arrays are only ever needed for their length)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)
    return field.contents()


def _config(reader: GGUFReader, path: str) -> dict:
    """The HF config dict, read with the GGUF keys of transformers' `GGUF_CONFIG_MAPPING`."""

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise JaxftError(f"{path}: GGUF metadata lacks 'llama.{key}' (expected a llama model)")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    # transformers prefers `llama.vocab_size` and falls back to the tokenizer's token count.
    vocab = _field(reader, "llama.vocab_size", _field(reader, "tokenizer.ggml.tokens"))
    if vocab is None:
        raise JaxftError(
            f"{path}: GGUF metadata states no vocabulary size (expected "
            "'llama.vocab_size' or 'tokenizer.ggml.tokens')"
        )
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        # A file without the key has plain multi-head attention.
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": _field(reader, "llama.rope.dimension_count", hidden // heads),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        # llama.cpp writes `output.weight` only when it differs from the embedding matrix.
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    for ours, theirs in [("bos", "bos"), ("eos", "eos"), ("pad", "padding")]:
        if (token := _field(reader, f"tokenizer.ggml.{theirs}_token_id")) is not None:
            config[f"{ours}_token_id"] = token
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": need("rope.scaling.factor")}
        if (original := _field(reader, "llama.rope.scaling.original_context_length")) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def read_gguf_config(path: str | os.PathLike) -> dict:
    """A Hugging Face `config.json`-style dict (LlamaConfig kwargs) for the GGUF file at `path`."""
    return _config(*_open(path))


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved rotary pairs back to HF's two halves).

    Same arithmetic as transformers' `LlamaTensorProcessor._reverse_permute_weights`.
    """
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, float32 array in HF layout)` one tensor at a time, to bound peak memory.

    Tied files (no `output.weight`) yield no `lm_head.weight`; the config says to tie it instead.
    """
    reader, path = _open(path)
    config = _config(reader, path)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        match = _NAME.fullmatch(tensor.name)
        if _DERIVED.fullmatch(tensor.name):
            continue
        table = _TOP_LEVEL if match and match[1] is None else _PER_LAYER
        if match is None or match[2] not in table:
            raise JaxftError(
                f"{path}: unexpected tensor {tensor.name!r} (expected the tensors of a dense llama)"
            )
        block, leaf, kind = match.groups()
        prefix = "" if block is None else f"model.layers.{block}."
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise JaxftError(
                f"{path}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from None
        if leaf in heads:
            weights = _unpermute(weights, heads[leaf])
        # F32 tensors come back as read-only views of the file's memmap: copy those (only those),
        # so every array a caller gets is its own and writable.
        yield (
            f"{prefix}{table[leaf]}.{kind}",
            weights.astype(np.float32, copy=not weights.flags.writeable),
        )
