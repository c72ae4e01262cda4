"""The LLaMA family: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM.

The three differ only in data (bias on q/k/v, sliding window, tied embeddings, rope scaling), so
one module serves them all. Module and parameter names follow Hugging Face (`model.layers.N.
self_attn.q_proj`), which keeps the weight mapping a rename plus transpose and lets LoRA targets
use the names users know from PEFT.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import layers
from jaxft.models.params import IDENTITY, TRANSPOSE, TensorMapping

MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    model_type: str = "llama"
    dtype: str | None = None  # compute dtype; None computes in the parameter dtype
    remat: str = "none"  # rematerialisation policy of the layer scan (see layers.REMAT_POLICIES)
    attention: str = "auto"  # 'xla' | 'cudnn' | 'auto' (see layers.dot_product_attention)
    attention_dropout: float = 0.0  # on attention probabilities, in training (HF's default: 0)
    hf_config_json: str = "{}"  # the original config.json, written back on export

    has_base_prefix = True  # exported names keep HF's `model.` prefix (a *ForCausalLM checkpoint)
    position_limit = None  # RoPE: no table of positions to run out of
    num_labels = None

    def to_hf(self) -> dict:
        """The Hugging Face config this model was loaded from."""
        return json.loads(self.hf_config_json)

    def may_be_missing(self, path: str) -> bool:
        """Every parameter must come from the checkpoint."""
        return False

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        if num_labels is not None:
            raise JaxftError("num_labels applies to BERT sequence classifiers, not causal LMs")
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in layers.ROPE_TYPES:
                raise JaxftError(
                    f"rope_scaling type {kind!r} is not supported (supported: "
                    f"{', '.join(layers.ROPE_TYPES)})"
                )
        window = None
        if model_type == "mistral" or hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            model_type=model_type,
            hf_config_json=json.dumps(hf, sort_keys=True),
        )


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
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            for w in ("weight", "bias")
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
            for p in ("gate_proj", "up_proj", "down_proj")
            for w in ("weight", "bias")
        ),
        ("model.norm.weight", "model.norm.weight", IDENTITY),
        ("lm_head.weight", "lm_head.kernel", TRANSPOSE),
    ),
    # Buffers some checkpoints carry that hold no parameters.
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    # A tied checkpoint may still list the head; it is the embedding, so it is skipped.
    ignored_when_tied=(r"lm_head\.weight",),
)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, h = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.q_proj = layers.Linear(
            d, cfg.num_attention_heads * h, ("embed", "heads"), bias=cfg.qkv_bias, **kw
        )
        self.k_proj = layers.Linear(
            d, cfg.num_key_value_heads * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw
        )
        self.v_proj = layers.Linear(
            d, cfg.num_key_value_heads * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw
        )
        self.o_proj = layers.Linear(
            cfg.num_attention_heads * h, d, ("heads", "embed"), bias=cfg.o_bias, **kw
        )
        self.head_dim = h
        self.attention = cfg.attention
        self.sliding_window = cfg.sliding_window
        self.dropout = layers.Dropout(cfg.attention_dropout)
        self.inv_freq = tuple(
            layers.rope_inverse_frequencies(
                h, cfg.rope_theta, dict(cfg.rope_scaling) if cfg.rope_scaling else None
            ).tolist()
        )

    def __call__(self, x, positions, mask, segment_ids=None, cache=None):
        b, t, _ = x.shape
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = self.q_proj(x).reshape(b, t, -1, self.head_dim)  # B T N H
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)  # B T K H
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)  # B T K H
        q, k = layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq)
        if cache is not None:
            k, v, cache = cache.update(k, v)
        out = layers.dot_product_attention(
            q, k, v, mask, self.head_dim**-0.5, implementation=self.attention, causal=True,
            probs_dropout=self.dropout, segment_ids=segment_ids,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.gate_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = layers.Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(layers.swiglu(self.gate_proj(x), self.up_proj(x)))


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

    def __call__(self, h, *, positions, mask, segment_ids=None, cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.self_attn(self.input_layernorm(h), positions, mask, segment_ids,
                                         cache)
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
        self.layers = layers.stack_layers(
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
        `cache` (`jaxft.kv_cache.Cache`) the tokens are appended to it and the call returns
        `(logits, cache)`; `jaxft.generate` drives it.
        """
        positions, mask, segments, cache = layers.causal_lm_inputs(
            input_ids, attention_mask, segment_ids, positions, cache, self.config.sliding_window
        )
        h = self.model.embed_tokens(input_ids)  # B T D
        h, layer_cache = layers.scan_layers(
            self.model.layers,
            h,
            remat=self.config.remat,
            cache=None if cache is None else cache.layers,
            positions=positions,
            mask=mask,
            segment_ids=segments,
        )
        h = self.model.norm(h)
        if cache is not None:
            cache = cache.replace(layers=layer_cache)
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
