"""Write a jaxft model as one llama.cpp `.gguf` file: what llama.cpp, Ollama and LM Studio load.

The inverse of `jaxft.hf.gguf` (which reads GGUF as if it were a Hugging Face checkpoint), and the
same conversion llama.cpp's own `convert_hf_to_gguf.py` performs for a Llama checkpoint: the
Hugging Face tensors of `jaxft.models.params.export_plan` get llama.cpp's names (the table in
`jaxft.hf.gguf`, read backwards), Q and K rows are permuted back into llama.cpp's rotary layout,
one-dimensional tensors (norms, biases) stay float32 and every matrix is stored as the chosen
type. The hyper-parameters go in under llama.cpp's keys, and the tokenizer and chat template
with them: copied field for field from a GGUF base, or built from a Hugging Face byte-level BPE
tokenizer as llama.cpp's converter builds it.

The file is written with the `gguf` package's writer, tensor by tensor: the header and tensor
table first, then each tensor gathered, converted and appended, so host memory holds one tensor
(not the model) at a time. It goes to a temporary name beside `out` and is renamed into place
only when complete, so a crash or a refusal never leaves a partial file or harms an older one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf.constants import GGML_QUANT_VERSION
from gguf.quants import quant_shape_to_byte_shape, quantize

from jaxft import lora, models, outdir, progress
from jaxft.errors import JaxftError
from jaxft.hf.gguf import gguf_name
from jaxft.models import params

# The storage types a user picks, as llama.cpp's converter names them (`--outtype`).
GGUF_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Hugging Face model types whose weights llama.cpp's `llama` architecture holds as they are
# (Mistral is converted as a Llama by llama.cpp too; its architecture has no sliding window).
LLAMA_MODEL_TYPES = ("llama", "mistral")
# Split patterns of byte-level tokenizers -> llama.cpp's pre-tokenizer names: the inverse of
# transformers' table where it is importable, plus GPT-2's own pattern (a bare ByteLevel).
_GPT2_PRE = "gpt2"


def check_exportable(model_type: str, hf_config: dict, source: str) -> None:
    """Refuse, in one line and before anything is loaded, a model GGUF export cannot express."""
    if model_type not in LLAMA_MODEL_TYPES:
        raise JaxftError(
            f"{source}: GGUF export writes llama.cpp's llama architecture (model_type "
            f"{', '.join(LLAMA_MODEL_TYPES)}); this run's model_type is {model_type!r} "
            "(export it as a Hugging Face model instead: drop --gguf)")
    scaling = hf_config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear"):
        raise JaxftError(
            f"{source}: rope_scaling type {kind!r} has no GGUF metadata that both llama.cpp and "
            "transformers read back (expected no rope scaling, or 'linear')")


def write_gguf(
    model: nnx.Module,
    out: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike | None,
    gguf_type: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (adapters already merged) as one `.gguf` file at `out`.

    `tokenizer_source` is the base checkpoint: a `.gguf` file (its tokenizer fields are copied)
    or a directory holding a byte-level BPE tokenizer. `gguf_type` is f32, f16, bf16 or q8_0.
    Only process 0 writes; every process must call it (each tensor is gathered from all).
    """
    out = check_output_file(out, overwrite=overwrite)
    qtype, file_type = check_gguf_type(gguf_type)
    hf = model.config.to_hf()
    check_exportable(model.config.model_type, hf, str(out))
    if lora.has_adapters(model):
        raise JaxftError("GGUF export needs the adapters merged first (lora.merge_lora)")
    plan = params.export_plan(nnx.state(model, nnx.Param), models.tensor_table(model.config),
                              num_layers=model.config.num_hidden_layers)
    heads = {"attn_q": hf["num_attention_heads"],
             "attn_k": hf.get("num_key_value_heads") or hf["num_attention_heads"]}

    writer = GGUFWriter(None, "llama")
    _add_hyperparameters(writer, hf, name or out.stem, file_type)
    if tokenizer_source is not None:
        _add_tokenizer(writer, Path(tokenizer_source))
    kinds = []
    for tensor in plan:
        name_in_file, leaf = gguf_name(tensor.name)
        kind = qtype if len(tensor.shape) == 2 else GGMLQuantizationType.F32
        if kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            try:
                byte_shape = quant_shape_to_byte_shape(tensor.shape, kind)
            except ValueError:  # rows not a whole number of blocks: as llama.cpp, fall back
                kind = GGMLQuantizationType.F16
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if kind == GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(name_in_file, tensor.shape, dtype,
                                   math.prod(tensor.shape) * dtype.itemsize)
        else:
            writer.add_tensor_info(name_in_file, byte_shape, np.dtype(np.uint8),
                                   math.prod(byte_shape), raw_dtype=kind)
        kinds.append((kind, heads.get(leaf)))

    writing = jax.process_index() == 0
    temporary = out.with_name(f".{out.name}.partial")
    try:
        if writing:
            writer.write_header_to_file(temporary)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        with progress.bar(sum(math.prod(t.shape) for t in plan), desc="writing GGUF",
                          unit="param", unit_scale=True) as bar:
            for tensor, (kind, n_head) in zip(plan, kinds, strict=True):
                array = np.asarray(tensor.fetch(), np.float32)  # gathered from every process
                if n_head is not None:
                    array = permute_for_llama_cpp(array, n_head)
                if writing:
                    writer.write_tensor_data(quantize(np.ascontiguousarray(array), kind))
                bar.update(array.size)
                del array
        if writing:
            writer.close()
            os.replace(temporary, out)
    finally:
        writer.close()
        if writing and temporary.exists():
            temporary.unlink()
    return out


def check_output_file(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse a `.gguf` output path that exists (unless `overwrite`) or cannot be written; changes
    nothing, so call it before minutes of loading."""
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise JaxftError(f"{out}: a GGUF export is one file; name it with a .gguf suffix")
    if out.is_dir():
        raise JaxftError(f"{out}: is a directory (expected the path of the .gguf file to write)")
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: exists (pass --overwrite, or overwrite=True, to replace it)")
    parent = out.parent
    outdir.check_directory(parent, "the GGUF file's directory")
    if jax.process_index() == 0:
        parent.mkdir(parents=True, exist_ok=True)
    return out


def check_gguf_type(gguf_type: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    """The (matrix storage type, llama.cpp file type) of a `gguf_type` name."""
    if gguf_type not in GGUF_TYPES:
        raise JaxftError(f"gguf_type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[gguf_type]


def permute_for_llama_cpp(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's two rotary halves back to llama.cpp's interleaved pairs (its converter's `permute`);
    the inverse of `jaxft.hf.gguf`'s unpermute, for Q/K weights and biases alike."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_hyperparameters(writer: GGUFWriter, hf: dict, name: str,
                         file_type: LlamaFileType) -> None:
    """llama.cpp's `llama.*` keys, the ones `jaxft.hf.gguf` and transformers read back."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(hf.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hf["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(hf.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    writer.add_vocab_size(hf["vocab_size"])
    scaling = hf.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_tokenizer(writer: GGUFWriter, source: Path) -> None:
    if source.suffix == ".gguf":
        _copy_tokenizer_fields(writer, source)
    else:
        _add_hf_tokenizer(writer, source)


def _copy_tokenizer_fields(writer: GGUFWriter, source: Path) -> None:
    """Every `tokenizer.*` field of the GGUF base, with its exact type: nothing re-derived."""
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _add_hf_tokenizer(writer: GGUFWriter, source: Path) -> None:
    """A byte-level BPE tokenizer as llama.cpp's converter writes one (`_set_vocab_gpt2`): every
    token in id order with its type, the merges, the special-token ids and the chat template."""
    from jaxft.hf.tokenizer import load_tokenizer

    tok = load_tokenizer(str(source))
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(backend):
        raise JaxftError(
            f"{source}: GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, "
            f"SmolLM style); this one is a {model.get('type')} tokenizer without a ByteLevel "
            "pre-tokenizer (export a Hugging Face model and convert it with llama.cpp instead)")
    vocab = tok.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = tok.added_tokens_decoder
    size = max(by_id) + 1
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for what, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tok, f"{what}_token_id")
        if token_id is not None:
            add(int(token_id))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
    writer.add_add_eos_token(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizers(backend: dict) -> list[dict[str, Any]]:
    pre = backend.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level(backend: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(backend))


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for the tokenizer's split pattern (`tokenizer.ggml.pre`): "gpt2" for a
    bare ByteLevel (GPT-2's pattern), the name transformers' GGUF reader maps to the same
    pattern otherwise, or "default" for one neither knows."""
    splits = [p for p in _pre_tokenizers(backend) if p.get("type") == "Split"]
    if not splits:
        return _GPT2_PRE
    pattern = (splits[0].get("pattern") or {}).get("Regex")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:
        return "default"
    return next((n for n, p in GGUF_PRE_TOKENIZER_SPLITS.items() if p == pattern), "default")


def describe_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of each storage type a GGUF file holds (what the export line reports)."""
    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts

