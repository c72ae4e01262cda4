"""The LLaMA family: Llama, Mistral, Qwen2, Qwen3 and Phi-3 (`*ForCausalLM`).

They differ only in data: bias on q/k/v, sliding windows (on every layer, or on some), tied
embeddings, rope scaling (linear, llama3, YaRN, Phi-3's longrope, partial rotary), Qwen3's
RMSNorm of each query and key head, and Phi-3's fused `qkv_proj` and `gate_up_proj`. So one
module serves them all. Module and parameter names follow Hugging Face
(`model.layers.N.self_attn.q_proj`), which keeps the weight mapping a rename plus transpose and
lets LoRA targets use the names users know from PEFT (`qkv_proj` and `gate_up_proj` on Phi-3,
as PEFT has them).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.kernels.swiglu import swiglu
from jaxft.models import attention, layers, rope, stack
from jaxft.models.params import IDENTITY, TRANSPOSE, TensorMapping

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and options, read from a Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs, hashable
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # Per layer: does it attend through the sliding window? None: every layer does when there
    # is a window (Mistral, Phi-3); Qwen's `layer_types` window only some.
    local_layers: tuple[bool, ...] | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head, before RoPE
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    partial_rotary_factor: float = 1.0  # the fraction of each head RoPE rotates
    max_position_embeddings: int | None = None  # read by longrope's default attention factor
    model_type: str = "llama"
    dtype: str | None = None  # compute dtype; None computes in the parameter dtype
    remat: str = "none"  # rematerialisation policy of the layer scan (see stack.REMAT_POLICIES)
    attention: str = "auto"  # 'xla' | 'cudnn' | 'auto' (see attention.dot_product_attention)
    attention_dropout: float = 0.0  # on attention probabilities, in training (HF's default: 0)
    hf_config_json: str = "{}"  # the original config.json, written back on export

    has_base_prefix = True  # exported names keep HF's `model.` prefix (a *ForCausalLM checkpoint)
    routes_tokens = False  # a mixture of experts (`jaxft.models.moe`) does
    position_limit = None  # RoPE: no table of positions to run out of
    num_labels = None

    def to_hf(self) -> dict:
        """The Hugging Face config this model was loaded from."""
        return json.loads(self.hf_config_json)

    def may_be_missing(self, path: str) -> bool:
        """Every parameter must come from the checkpoint."""
        return False

    @property
    def rope(self) -> rope.Rope:
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        return rope.Rope.from_hf(self.head_dim, self.rope_theta, scaling,
                                   partial_rotary_factor=self.partial_rotary_factor,
                                   max_position_embeddings=self.max_position_embeddings)

    @property
    def layer_kinds(self) -> tuple[bool, ...] | bool:
        """Which layers attend locally: one bool when all alike, else one per layer."""
        if self.sliding_window is None:
            return False
        if self.local_layers is None or len(set(self.local_layers)) == 1:
            return True if self.local_layers is None else self.local_layers[0]
        return self.local_layers

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        if num_labels is not None:
            raise JaxftError("num_labels applies to BERT sequence classifiers, not causal LMs")
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        theta, scaling, partial = rope_settings(hf)
        window, local = None, None
        if model_type in ("mistral", "phi3") or hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
        if window is not None and model_type in ("qwen2", "qwen3"):
            local = _qwen_local_layers(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            local_layers=local,
            qk_norm=model_type == "qwen3",
            fused_projections=model_type == "phi3",
            partial_rotary_factor=partial,
            max_position_embeddings=hf.get("max_position_embeddings"),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            model_type=model_type,
            hf_config_json=json.dumps(hf, sort_keys=True),
        )


def rope_settings(hf: dict, params: dict | None = None) -> tuple[float, tuple | None, float]:
    """(theta, scaling as sorted pairs or None, partial rotary factor) from a config.json in
    either of transformers' forms: `rope_theta` + `rope_scaling` (configs on the Hub), or
    `rope_parameters` (what transformers 5 saves). `params` is one layer kind's parameters when
    a config has several (Gemma 3)."""
    params = dict(params if params is not None else hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = dict(hf.get("rope_scaling") or
                   (params if params.get("rope_type", params.get("type", "default")) != "default"
                    else {}))
    if not scaling:
        return theta, None, partial
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":  # transformers' renaming
        kind = "longrope"
    if kind not in rope.ROPE_TYPES:
        raise JaxftError(
            f"rope_scaling type {kind!r} is not supported (supported: "
            f"{', '.join(rope.ROPE_TYPES)})"
        )
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    if kind == "longrope":
        scaling.setdefault("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings"))
    if kind == "yarn":  # transformers' standardize_rope_params: the top-level field first
        scaling["original_max_position_embeddings"] = (
            hf.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings"))
    hashable = {k: tuple(v) if isinstance(v, list) else v for k, v in scaling.items()}
    return theta, tuple(sorted(hashable.items())), partial


def _qwen_local_layers(hf: dict) -> tuple[bool, ...]:
    """Qwen's windowed layers: `layer_types` when saved, else those from `max_window_layers`."""
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types")
    if kinds:
        return tuple(kind == "sliding_attention" for kind in kinds)
    return tuple(i >= hf.get("max_window_layers", n) for i in range(n))


# Buffers some checkpoints carry that hold no parameters.
HF_TENSORS_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# Hugging Face tensor name -> (jaxft parameter path, transform). `{L}` is the layer index, which
# selects a slice of the stacked layer arrays. Read one way to load, the other way to export.
HF_TENSORS = TensorMapping(
    (
        ("model.embed_tokens.weight", "model.embed_tokens.embedding", IDENTITY),
        (
            "model.layers.{L}.input_layernorm.weight",
            "model.layers.input_layernorm.weight",
            IDENTITY,
        ),
        *(
            (
                f"model.layers.{{L}}.self_attn.{p}.{w}",
                f"model.layers.self_attn.{p}.{'kernel' if w == 'weight' else 'bias'}",
                TRANSPOSE if w == "weight" else IDENTITY,
            )
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
            for w in ("weight", "bias")
        ),
        *(
            (f"model.layers.{{L}}.self_attn.{n}.weight", f"model.layers.self_attn.{n}.weight",
             IDENTITY)
            for n in ("q_norm", "k_norm")
        ),
        (
            "model.layers.{L}.post_attention_layernorm.weight",
            "model.layers.post_attention_layernorm.weight",
            IDENTITY,
        ),
        *(
            (
                f"model.layers.{{L}}.mlp.{p}.{w}",
                f"model.layers.mlp.{p}.{'kernel' if w == 'weight' else 'bias'}",
                TRANSPOSE if w == "weight" else IDENTITY,
            )
            for p in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
            for w in ("weight", "bias")
        ),
        ("model.norm.weight", "model.norm.weight", IDENTITY),
        ("lm_head.weight", "lm_head.kernel", TRANSPOSE),
    ),
    ignored=HF_TENSORS_IGNORED,
    # A tied checkpoint may still list the head; it must be the embedding, and is skipped.
    tied_head=("lm_head.weight", "model.embed_tokens.weight"),
)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, h = cfg.hidden_size, cfg.head_dim
        n, kv = cfg.num_attention_heads * h, cfg.num_key_value_heads * h
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        if cfg.fused_projections:
            self.qkv_proj = layers.Linear(d, n + 2 * kv, ("embed", "qkv"), bias=cfg.qkv_bias,
                                          **kw)
        else:
            self.q_proj = layers.Linear(d, n, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
            self.k_proj = layers.Linear(d, kv, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
            self.v_proj = layers.Linear(d, kv, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = layers.Linear(n, d, ("heads", "embed"), bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = layers.RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = layers.RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.sinks = (layers.param(rngs, nnx.initializers.zeros, (cfg.num_attention_heads,),
                                   (None,), param_dtype) if cfg.attention_sinks
                      else nnx.data(None))
        self.head_dim = h
        self.split = (n, n + kv)
        self.fused = cfg.fused_projections
        self.qk_norm = cfg.qk_norm
        self.attention = cfg.attention
        self.dropout = layers.Dropout(cfg.attention_dropout)
        self.rope = cfg.rope

    def __call__(self, x, positions, masks, local, segment_ids=None, cache=None):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = jnp.split(self.qkv_proj(x), self.split, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, -1, self.head_dim)  # B T N H
        k = k.reshape(b, t, -1, self.head_dim)  # B T K H
        v = v.reshape(b, t, -1, self.head_dim)  # B T K H
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.rope.frequencies(positions)
        q, k = self.rope(q, positions, inv_freq), self.rope(k, positions, inv_freq)
        if cache is not None:
            k, v, cache = cache.update(k, v)
        out = attention.layer_attention(
            q, k, v, masks, local, self.head_dim**-0.5, implementation=self.attention,
            causal=True, probs_dropout=self.dropout, segment_ids=segment_ids,
            **({} if self.sinks is None else {"sinks": self.sinks[...]}),
        )
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        if cfg.fused_projections:
            self.gate_up_proj = layers.Linear(d, 2 * f, ("embed", "mlp"), **kw)
        else:
            self.gate_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
            self.up_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = layers.Linear(f, d, ("mlp", "embed"), **kw)
        self.fused = cfg.fused_projections

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.input_layernorm = layers.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.self_attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
        )
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, h, *, positions, masks, local=False, segment_ids=None, cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.self_attn(self.input_layernorm(h), positions, masks, local,
                                         segment_ids, cache)
        h = h + attn
        with jax.named_scope("mlp"):
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache


class Backbone(nnx.Module):
    """HF's `model.*`: embeddings, the stacked decoder layers, the final norm."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.embed_tokens = layers.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            ("vocab", "embed"),
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=cfg.dtype,
        )
        self.layers = stack.stack_layers(
            [
                DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class Model(nnx.Module):
    """A causal language model: `model(input_ids, attention_mask)` -> logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.model = Backbone(cfg, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else layers.Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                bias=False,
                rngs=rngs,
                param_dtype=param_dtype,
                dtype=cfg.dtype,
            )
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        segment_ids=None,
        positions=None,
        cache=None,
        return_hidden: bool = False,
    ):
        """Logits for `input_ids` [B, T].

        `attention_mask` (1 = token, 0 = padding) or `segment_ids` (packed examples) keep
        attention inside each example; `positions` default to 0..T-1 as in transformers. With a
        `cache` (`jaxft.models.kv_cache.Cache`) the tokens are appended to it and the call returns
        `(logits, cache)`; `jaxft.generate` drives it.
        """
        positions, mask, segments, cache = attention.causal_lm_inputs(
            input_ids, attention_mask, segment_ids, positions, cache
        )
        h, cache = stack.run_decoder(
            self.model.layers, self.model.norm, self.model.embed_tokens(input_ids),  # B T D
            positions=positions, mask=mask, segment_ids=segments, cache=cache,
            window=self.config.sliding_window, kinds=self.config.layer_kinds,
            remat=self.config.remat)
        if return_hidden:
            return h if cache is None else (h, cache)
        logits = self.logits(h)  # B T V
        return logits if cache is None else (logits, cache)

    def logits(self, h):
        """The output head on final hidden states [B, T, D] -> [B, T, V] (generation applies
        it to the last position only)."""
        return self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

    def output_head(self) -> jax.Array | None:
        """The head as one [D, V] matrix in the compute dtype, so the loss can fuse it with the
        cross-entropy; None when it is more than a matmul (an adapter on lm_head)."""
        if self.lm_head is None:
            return self.model.embed_tokens.as_head()
        if self.lm_head.adapter is not None or self.lm_head.bias is not None:
            return None
        return self.lm_head.kernel[...].astype(self.lm_head.dtype or self.lm_head.kernel.dtype)
