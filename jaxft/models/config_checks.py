"""What a `config.json` must hold for any family to build a model from it: sizes that are
positive whole numbers and fit together. Checked before anything reads the sizes (transformers'
own config classes included, which divide by some of them), so a bad file is one line naming
the field, never a traceback or a silently different model.
"""

from __future__ import annotations

from typing import Any

# Sizes that must be positive whole numbers wherever a config.json has them (GPT-2 names some
# of them its own way).
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "sliding_window_pattern", "type_vocab_size", "n_embd", "n_head", "n_layer",
            "n_positions", "n_inner", "max_window_layers", "moe_intermediate_size",
            "num_experts", "num_local_experts", "num_experts_per_tok")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Sizes a config.json must state: transformers would fill them with its reference model's
# (4096 wide, 32 layers …), which no checkpoint's weights but that one's fit.
# A tuple names one size that configs spell two ways (Qwen's `num_experts` is transformers 5's
# `num_local_experts`). Qwen3-MoE's `intermediate_size` is the width of dense layers it may not
# have, so its experts' width is the one it must state.
_SHARED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
STATED: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head"),
    "qwen3_moe": (*_SHARED, "moe_intermediate_size", ("num_experts", "num_local_experts")),
    "mixtral": (*_SHARED, "intermediate_size", "num_local_experts"),
    "gpt_oss": (*_SHARED, "intermediate_size", "num_local_experts"),
}
STATED_OTHERWISE = (*_SHARED, "intermediate_size")


def unstated(hf: dict[str, Any]) -> list[str]:
    """The sizes a config leaves out that are never taken from a default."""
    missing = []
    for field in STATED.get(hf.get("model_type"), STATED_OTHERWISE):
        names = field if isinstance(field, tuple) else (field,)
        if not any(name in hf for name in names):
            missing.append(names[0])
    return missing


def problems(hf: dict[str, Any]) -> list[str]:
    """Everything wrong with a config's sizes, each naming its field (empty: none)."""
    found = []
    for field in POSITIVE:
        value = hf.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            found.append(f"{field} must be a positive whole number, got {value!r}")
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window <= 0):
        found.append(f"sliding_window must be a positive number of tokens or null (no window), "
                     f"got {window!r}")
    if found:  # the checks below divide by these
        return found
    heads = hf.get("num_attention_heads") or hf.get("n_head")
    kv_heads = hf.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        found.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                     f"({kv_heads})")
    width = hf.get("hidden_size") or hf.get("n_embd")
    if heads and width and hf.get("head_dim") is None and width % heads:
        found.append(f"hidden_size ({width}) must be a multiple of num_attention_heads ({heads}) "
                     "when head_dim is not given")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim % 2 and hf.get("model_type") not in ("gpt2", "bert"):
        found.append(f"head_dim must be even (rotary embeddings turn pairs of dims), got "
                     f"{head_dim}")
    layers = hf.get("num_hidden_layers") or hf.get("n_layer")
    kinds = hf.get("layer_types")
    if kinds is not None:
        if not isinstance(kinds, list) or any(k not in LAYER_TYPES for k in kinds):
            found.append(f"layer_types must be a list of {' / '.join(LAYER_TYPES)}, got "
                         f"{kinds!r}")
        elif layers and len(kinds) != layers:
            found.append(f"layer_types has {len(kinds)} entries for {layers} layers "
                         "(num_hidden_layers)")
        elif "sliding_attention" in kinds and hf.get("sliding_window") is None and \
                "sliding_window" in hf:
            found.append("layer_types has sliding_attention layers but sliding_window is null "
                         "(Qwen: use_sliding_window is off)")
    for field in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        value = hf.get(field)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            found.append(f"{field} must be a positive number, got {value!r}")
    return found
