"""Tiny random-init transformers models, saved to disk the way users' checkpoints are."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 128


def llama_config(**overrides) -> transformers.PretrainedConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


CAUSAL_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4
    ),
    "llama": lambda: llama_config(),
    "llama_gqa_untied_llama3_rope": lambda: llama_config(
        num_key_value_heads=2,
        head_dim=32,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_linear_rope_tied": lambda: llama_config(
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "mistral_gqa": lambda: transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=6,
    ),
    "qwen2_bias_tied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def bert_config(**overrides) -> transformers.BertConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def build(config, cls=transformers.AutoModelForCausalLM, seed: int = 0) -> torch.nn.Module:
    """A random-init transformers model in eval mode (dropout off), float32."""
    torch.manual_seed(seed)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return model.float().eval()


def padded_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = VOCAB):
    """Random ids and a right-padded attention mask with rows of different lengths."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):
        mask[row, length - 3 * row :] = 0
    ids[mask == 0] = 0
    return ids, mask
