"""GGUF export: a trained run as one llama.cpp file that jaxft and transformers read back.

The reference is the merged model exported as a Hugging Face checkpoint and loaded by
transformers in float32, with its matrices rounded to the file's storage type exactly as the
`gguf` package rounds them (norms stay float32, as in llama.cpp's files): what the file claims to
hold. Both readers must reproduce that reference's logits within 1e-4.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

import jaxft
from jaxft import export, train
from jaxft.errors import JaxftError
from jaxft.hf import gguf_write
from jaxft.hf.tokenizer import load_tokenizer
from tests import hf_models
from tests.real_weights import smollm2_gguf_path
from tests.terminal import on_a_terminal
from tests.test_models import torch_logits
from tests.tiny_run import tiny_config, tiny_model_dir

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

STORAGE = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
           "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict[str, Path]:
    """A 5-step LoRA run on a tiny GQA Llama (untied head), and its merged HF export."""
    root = tmp_path_factory.mktemp("gguf_export")
    base = tiny_model_dir(root / "base", num_key_value_heads=2, tie_word_embeddings=False)
    workdir = root / "run"
    train.run(tiny_config(base, workdir, **{"checkpoint.every": 5}))
    merged = export.export_workdir(workdir, root / "merged", merged=True)
    return {"root": root, "base": base, "workdir": workdir, "merged": merged}


def _rounded_reference(merged: Path, gguf_type: str) -> transformers.PreTrainedModel:
    """transformers' model of the HF export, every matrix rounded through the storage type."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    kind = STORAGE[gguf_type]
    with torch.no_grad():
        for parameter in hf.parameters():
            if parameter.ndim == 2:
                stored = quantize(parameter.numpy(), kind)
                parameter.copy_(torch.from_numpy(
                    dequantize(stored, kind).reshape(parameter.shape).astype(np.float32)))
    return hf


def _jaxft_logits(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = jaxft.from_pretrained(path, dtype="float32")
    return np.asarray(model(ids, mask))


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_both_readers_reproduce_the_exported_model(lora_run, gguf_type) -> None:
    out = export.export_gguf(lora_run["workdir"], lora_run["root"] / f"{gguf_type}.gguf",
                             gguf_type=gguf_type)
    ids, mask = hf_models.padded_batch(vocab=600)
    expected = torch_logits(_rounded_reference(lora_run["merged"], gguf_type), ids, mask)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(theirs, ids, mask)[valid], expected[valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(_jaxft_logits(out, ids, mask)[valid], expected[valid],
                               atol=1e-4, rtol=0)
    kinds = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert kinds["blk.0.attn_q.weight"] == STORAGE[gguf_type]
    assert kinds["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" in kinds  # an untied head is written; a tied one is not


def test_q8_0_stays_within_its_stated_tolerance_of_float32(lora_run) -> None:
    """q8_0's own rounding (8 bits per weight, one scale per 32) costs at most 1% of the logit
    range on this model: the tolerance the README states."""
    out = export.export_gguf(lora_run["workdir"], lora_run["root"] / "tol.gguf",
                             gguf_type="q8_0")
    ids, mask = hf_models.padded_batch(vocab=600)
    valid = mask.astype(bool)
    exact = _jaxft_logits(lora_run["merged"], ids, mask)[valid]
    q8 = _jaxft_logits(out, ids, mask)[valid]
    assert np.abs(q8 - exact).max() <= 0.01 * (exact.max() - exact.min())
    assert (q8.argmax(-1) == exact.argmax(-1)).mean() >= 0.9
    sizes = {t: (lora_run["root"] / f"{t}.gguf").stat().st_size
             for t in ("f32", "q8_0") if (lora_run["root"] / f"{t}.gguf").exists()}
    if len(sizes) == 2:
        assert sizes["q8_0"] < 0.5 * sizes["f32"]


def test_the_tokenizer_and_chat_template_travel_in_the_file(lora_run) -> None:
    out = export.export_gguf(lora_run["workdir"], lora_run["root"] / "tok.gguf")
    original = load_tokenizer(str(lora_run["base"]))
    rebuilt = load_tokenizer(str(out))
    texts = ["How do I reset my password?", " two  spaces\nand a newline",
             "<|im_start|>user\nhi<|im_end|>", "ünïcödé & digits 12345"]
    for text in texts:
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text
    messages = [{"role": "user", "content": "Where is my order?"}]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == \
        original.apply_chat_template(messages, tokenize=False)
    fields = {k: f.contents() for k, f in GGUFReader(out).fields.items()
              if k.startswith(("tokenizer.ggml.model", "tokenizer.ggml.pre", "llama.block"))}
    assert fields == {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
                      "llama.block_count": 2}


def test_smollm2_round_trip_generates_the_same_text(tmp_path) -> None:
    """The real SmolLM2 (a Q4_1 GGUF) out again as f16: same greedy text, same tokenizer."""
    from jaxft import generate as G

    source = smollm2_gguf_path()
    model = jaxft.from_pretrained(source, dtype="float32")
    out = gguf_write.write_gguf(model, tmp_path / "smollm2.gguf", tokenizer_source=source,
                                 gguf_type="f16")
    tokenizer, again = load_tokenizer(source), load_tokenizer(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert again.apply_chat_template(messages, tokenize=False) == \
        tokenizer.apply_chat_template(messages, tokenize=False)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]])
    stop = G.stop_ids(model, tokenizer)
    first = G.generate_ids(model, prompt, max_new_tokens=16, eos_ids=stop)
    reloaded = jaxft.from_pretrained(out, dtype="float32")
    second = G.generate_ids(reloaded, prompt, max_new_tokens=16, eos_ids=stop)
    assert tokenizer.decode(second[0]) == tokenizer.decode(first[0])
    assert out.stat().st_size < 0.6 * 135e6 * 4  # matrices in f16, not float32


def test_refusals_are_one_line_and_touch_nothing(lora_run, tmp_path) -> None:
    existing = tmp_path / "kept.gguf"
    existing.write_bytes(b"an older export")
    with pytest.raises(JaxftError, match="exists"):
        export.export_gguf(lora_run["workdir"], existing)
    assert existing.read_bytes() == b"an older export"
    with pytest.raises(JaxftError, match="gguf_type 'q4_k' is not one of f32, f16, bf16, q8_0"):
        export.export_gguf(lora_run["workdir"], tmp_path / "a.gguf", gguf_type="q4_k")
    with pytest.raises(JaxftError, match="with a .gguf suffix"):
        export.export_gguf(lora_run["workdir"], tmp_path / "model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_families_gguf_cannot_hold_are_refused_before_loading(tmp_path, family) -> None:
    base = tiny_model_dir(tmp_path / "base", family=family)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(
        {"model": {"path": str(base), "resolved_path": str(base)}}))  # no checkpoint at all
    with pytest.raises(JaxftError, match=f"model_type is '{family}'.*drop --gguf"):
        export.export_gguf(workdir, tmp_path / "x.gguf")


def test_command_line_writes_the_file_and_draws_progress_on_a_terminal(lora_run) -> None:
    """The command as a user at a terminal runs it: bars on stderr (none with --noprogress),
    and a closing line saying what was written and how to run it."""
    out = lora_run["root"] / "cli.gguf"
    args = ["jaxft.export", f"--workdir={lora_run['workdir']}", f"--out={out}", "--gguf"]
    code, stdout, stderr = on_a_terminal([*args, "--gguf_type=q8_0"])
    assert code == 0, stderr[-2000:]
    assert f"wrote a GGUF file to {out}" in stdout and "Q8_0" in stdout, stdout
    for bar in ("loading weights", "tensor/s", "writing GGUF"):
        assert bar in stderr, (bar, stderr[-2000:])
    assert {t.tensor_type for t in GGUFReader(out).tensors} == {
        GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32}
    code, stdout, stderr = on_a_terminal([*args, "--overwrite", "--noprogress"])
    assert code == 0 and "F16" in stdout, stderr[-2000:]
    assert "loading weights" not in stderr and "writing GGUF" not in stderr, stderr[-2000:]


def test_the_file_is_written_a_tensor_at_a_time(tmp_path) -> None:
    """Host memory during the export holds a tensor or two, never the model."""
    hf = hf_models.build(hf_models.llama_config(vocab_size=1024, hidden_size=256,
                                                intermediate_size=512, num_hidden_layers=4))
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in")
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    largest = max(x[0].nbytes if x.ndim == 3 else x.nbytes
                  for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tracemalloc.start()
    try:
        out = gguf_write.write_gguf(model, tmp_path / "m.gguf", tokenizer_source=None,
                                     gguf_type="q8_0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 12e6 and peak < 4 * largest < total / 3
    ids, mask = hf_models.padded_batch(vocab=1024)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(theirs, ids, mask)[valid],
                               _jaxft_logits(out, ids, mask)[valid], atol=1e-4, rtol=0)
