"""Parity on real pretrained weights shipped as registry packages (see tests/real_weights.py)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from tests.real_weights import minilm_dir, smollm2_gguf_path, smollm2_transformers

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)


@pytest.fixture(scope="module")
def smollm2():
    path = Path(smollm2_gguf_path())
    hf = smollm2_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return jaxft.from_pretrained(path), hf, tokenizer


def test_smollm2_logits_match_transformers(smollm2):
    model, hf, tokenizer = smollm2
    batch = tokenizer(
        ["The capital of France is", "Fine-tuning a language model on support tickets teaches it"],
        padding=True,
        return_tensors="np",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert tokenizer.padding_side == "right" or mask.all(axis=0)[0]
    with torch.no_grad():
        expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    scale = np.abs(expected[real]).max()
    # 30 layers in float32: measured max abs diff 1.0e-4 on logits of magnitude 27 (3.7e-6 rel).
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4 * scale, rtol=0)


def test_smollm2_greedy_text_matches_transformers(smollm2):
    model, hf, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        ).numpy()
    tokens = ids
    for _ in range(8):  # full recompute each step: the reference, not the fast path
        logits = np.asarray(model(jnp.asarray(tokens)))
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert tokenizer.decode(tokens[0]) == tokenizer.decode(expected[0])
    assert "Paris" in tokenizer.decode(tokens[0])


def test_minilm_hidden_states_match_transformers():
    path = minilm_dir()
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "My order arrived damaged, how do I get a refund?",
        "The patient reported mild headaches after the second dose.",
        "Hello",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="np")  # pads to 128 by default
    with torch.no_grad():
        expected = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    model = jaxft.from_pretrained(path)
    got = np.asarray(
        model(
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            jnp.asarray(batch["token_type_ids"]),
        )
    )
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
