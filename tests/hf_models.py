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


_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_SPECIAL_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # inside the tiny vocab

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
    # Qwen3: RMSNorm of each query/key head; a 4-token window on the layers from 1 on (Qwen's
    # max_window_layers), so local and global layers mix; a head_dim unlike hidden/heads.
    "qwen3_qk_norm_mixed_window": lambda: transformers.Qwen3Config(
        **_SMALL, head_dim=32, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        tie_word_embeddings=True),
    # Phi-3: fused qkv_proj/gate_up_proj, a 5-token window, longrope past position 8 (the test
    # sequences pass it: the long factors apply).
    "phi3_longrope_window": lambda: transformers.Phi3Config(
        **{**_SMALL, "max_position_embeddings": 64}, **_SPECIAL_IDS, sliding_window=5,
        original_max_position_embeddings=8,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.3 * i for i in range(8)]}),
    # Phi-4-mini's shape of Phi-3: half of each head rotated, longrope within its short context.
    "phi3_partial_rotary": lambda: transformers.Phi3Config(
        **{**_SMALL, "max_position_embeddings": 256}, **_SPECIAL_IDS, partial_rotary_factor=0.5,
        original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(4)],
                      "long_factor": [3.0] * 4}),
    # Gemma 2: alternating 5-token local and global layers, both soft-caps small enough to
    # bite at this init, query_pre_attn_scalar unlike head_dim, tied head. transformers computes
    # the caps only on its eager path (sdpa drops them).
    "gemma2_softcap_window": lambda: transformers.Gemma2Config(
        **{**_SMALL, "num_hidden_layers": 4}, **_SPECIAL_IDS, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=24, attn_logit_softcapping=0.02, final_logit_softcapping=0.3,
        attn_implementation="eager"),
    # Gemma 3: q/k norms, two local layers per global one, each kind its own RoPE (linear
    # scaling on the global layers), untied head.
    "gemma3_local_global_rope": lambda: transformers.Gemma3TextConfig(
        **{**_SMALL, "num_hidden_layers": 6}, **_SPECIAL_IDS, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=24, sliding_window_pattern=3, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # Mixtures of experts, initialised at std 0.1 (not 0.02) so that the experts' share of the
    # logits is large enough for a routing error to show at 1e-4.
    # Qwen3-MoE: 6 experts of width 32, top-2 renormalised (norm_topk_prob), q/k norms, GQA,
    # YaRN RoPE (its long-context setting, scaled down).
    "qwen3_moe_topk_norm": lambda: transformers.Qwen3MoeConfig(
        **_SMALL, head_dim=16, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, initializer_range=0.1,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    # Qwen3-MoE's own default: top-3 of 5 experts as the softmax gives them, a tied head; the
    # second of four layers keeps a dense MLP of width 96 (mlp_only_layers).
    "qwen3_moe_top3_raw": lambda: transformers.Qwen3MoeConfig(
        **{**_SMALL, "num_hidden_layers": 4}, moe_intermediate_size=24, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=False, tie_word_embeddings=True,
        initializer_range=0.1, mlp_only_layers=[1]),
    # Mixtral: 4 experts, top-2, one KV head, a 5-token sliding window, the load-balancing
    # loss in the training loss (output_router_logits).
    "mixtral_gqa_window": lambda: transformers.MixtralConfig(
        **{**_SMALL, "intermediate_size": 32, "num_key_value_heads": 1}, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=5, initializer_range=0.1,
        output_router_logits=True, router_aux_loss_coef=0.02),
    # gpt-oss: 4 biased experts, top-2 softmaxed, alternating gate/up columns and the clamped
    # SwiGLU (a limit small enough to bite at this init), attention sinks and biases, a 5-token
    # window on every other layer, YaRN RoPE, the aux loss in the training loss.
    "gpt_oss_sinks_window": lambda: transformers.GptOssConfig(
        **{**_SMALL, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=5, initializer_range=0.1, swiglu_limit=0.5,
        output_router_logits=True, router_aux_loss_coef=0.02,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 32}),
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
    if getattr(config, "model_type", None) == "gpt_oss":  # its expert biases start at zero
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith("_proj_bias"):
                    weight.normal_(0.0, 0.3)
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
