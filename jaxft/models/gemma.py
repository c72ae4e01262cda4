"""The Gemma family: Gemma, Gemma 2 and Gemma 3's text models (`*ForCausalLM`).

What sets them apart from LLaMA, all of it data or a switch here:
- the token embedding is multiplied by √d (rounded to the embedding's dtype, as transformers
  does), and the head is tied to it;
- RMSNorm scales by (1 + w), in float32 before the cast back;
- the MLP is GeGLU with tanh-approximated GELU;
- Gemma 2 and 3 norm the output of attention and of the MLP too (four norms per layer), scale
  queries by `query_pre_attn_scalar`^-½ rather than head_dim^-½, and alternate sliding-window
  (local) layers with global ones: 1:1 in Gemma 2, 5:1 in Gemma 3 (`layer_types`);
- Gemma 2 soft-caps attention scores and the final logits, `cap · tanh(x / cap)`;
- Gemma 3 RMSNorms each query and key head, and gives local and global layers their own RoPE
  (base 10k without scaling locally; 1M, with the checkpoint's scaling, globally).

The layers stay one stacked scan: which layers are local is a per-layer flag
(`stack.scan_layers`' `per_layer`), and each layer picks its mask and RoPE frequencies by it.
Tensor names are transformers' (`model.layers.N.pre_feedforward_layernorm`), so LoRA targets are
PEFT's.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import attention, layers, rope, stack
from jaxft.models.llama import rope_settings
from jaxft.models.params import IDENTITY, TRANSPOSE, TensorMapping

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


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
    query_pre_attn_scalar: float
    rms_norm_eps: float = 1e-6
    rope: rope.Rope = rope.Rope(())  # global layers'
    local_rope: rope.Rope | None = None  # local layers' when it differs (Gemma 3)
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] = ()  # per layer: attends through the sliding window
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    post_norms: bool = False  # Gemma 2 and 3: norms after attention and after the MLP
    qk_norm: bool = False  # Gemma 3
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    model_type: str = "gemma2"
    dtype: str | None = None  # compute dtype; None computes in the parameter dtype
    remat: str = "none"
    attention: str = "auto"
    attention_dropout: float = 0.0
    hf_config_json: str = "{}"

    has_base_prefix = True
    position_limit = None
    num_labels = None
    routes_tokens = False

    def to_hf(self) -> dict:
        return json.loads(self.hf_config_json)

    def may_be_missing(self, path: str) -> bool:
        return False

    @property
    def layer_kinds(self) -> tuple[bool, ...] | bool:
        """Which layers attend locally: one bool when all alike, else one per layer."""
        if self.sliding_window is None or not any(self.local_layers):
            return False
        return True if all(self.local_layers) else self.local_layers

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        if num_labels is not None:
            raise JaxftError("num_labels applies to BERT sequence classifiers, not causal LMs")
        model_type = hf["model_type"]
        if hf.get("use_bidirectional_attention"):
            raise JaxftError("config.json: use_bidirectional_attention (an embedding model) is "
                             "not supported; jaxft loads Gemma's causal language models")
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in ACTIVATIONS:
            raise JaxftError(f"config.json: hidden_activation {activation!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        n = hf["num_hidden_layers"]
        global_rope, local_rope = _ropes(hf, head_dim)
        window = hf.get("sliding_window") if model_type != "gemma" else None
        kinds = hf.get("layer_types") or _default_layer_types(model_type, n, hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=global_rope,
            local_rope=local_rope,
            sliding_window=window,
            local_layers=tuple(kind == "sliding_attention" for kind in kinds),
            # transformers' Gemma 3 attention does not pass the cap on (it is None in every
            # released config); jaxft computes what transformers computes.
            attn_logit_softcapping=(hf.get("attn_logit_softcapping")
                                    if model_type == "gemma2" else None),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            post_norms=model_type != "gemma",
            qk_norm=model_type == "gemma3_text",
            attention_bias=bool(hf.get("attention_bias", False)),
            hidden_activation=activation,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            attention_dropout=float(hf.get("attention_dropout") or 0.0),
            model_type=model_type,
            hf_config_json=json.dumps(hf, sort_keys=True),
        )


def _default_layer_types(model_type: str, n: int, hf: dict) -> list[str]:
    """transformers' defaults when config.json has no `layer_types`: Gemma 2 alternates from a
    local first layer; Gemma 3 makes every `sliding_window_pattern`-th layer global."""
    if model_type == "gemma":
        return ["full_attention"] * n
    pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _ropes(hf: dict, head_dim: int) -> tuple[rope.Rope, rope.Rope | None]:
    """(global layers' RoPE, local layers' when it differs). Gemma 3 keeps one set of rope
    parameters per layer type (`rope_parameters: {full_attention: …, sliding_attention: …}`),
    or, in configs on the Hub, `rope_theta` + `rope_scaling` for global layers and
    `rope_local_base_freq` for local ones."""
    def make(theta, scaling):
        return rope.Rope.from_hf(head_dim, theta, dict(scaling) if scaling else None)

    params = hf.get("rope_parameters") or {}
    if hf["model_type"] != "gemma3_text":
        theta, scaling, _ = rope_settings(hf)
        return make(theta, scaling), None
    if "full_attention" in params or "sliding_attention" in params:
        per_kind = {}
        for kind in ("full_attention", "sliding_attention"):
            theta, scaling, _ = rope_settings({}, params.get(kind) or {})
            per_kind[kind] = make(theta, scaling)
        return per_kind["full_attention"], per_kind["sliding_attention"]
    theta, scaling, _ = rope_settings({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
    return make(theta, scaling), make(float(hf.get("rope_local_base_freq", 10_000.0)), None)


HF_TENSORS = TensorMapping(
    (
        ("model.embed_tokens.weight", "model.embed_tokens.embedding", IDENTITY),
        *(
            (f"model.layers.{{L}}.{n}.weight", f"model.layers.{n}.weight", IDENTITY)
            for n in ("input_layernorm", "post_attention_layernorm",
                      "pre_feedforward_layernorm", "post_feedforward_layernorm",
                      "self_attn.q_norm", "self_attn.k_norm")
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
        *(
            (f"model.layers.{{L}}.mlp.{p}.weight", f"model.layers.mlp.{p}.kernel", TRANSPOSE)
            for p in ("gate_proj", "up_proj", "down_proj")
        ),
        ("model.norm.weight", "model.norm.weight", IDENTITY),
        ("lm_head.weight", "lm_head.kernel", TRANSPOSE),
    ),
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    tied_head=("lm_head.weight", "model.embed_tokens.weight"),
)


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: x / rms(x) · (1 + w), all in float32, then cast back (LLaMA's casts
    before the scale). The checkpoint stores w, initialised at zero."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, h = cfg.hidden_size, cfg.head_dim
        n, kv = cfg.num_attention_heads * h, cfg.num_key_value_heads * h
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype, bias=cfg.attention_bias)
        self.q_proj = layers.Linear(d, n, ("embed", "heads"), **kw)
        self.k_proj = layers.Linear(d, kv, ("embed", "kv_heads"), **kw)
        self.v_proj = layers.Linear(d, kv, ("embed", "kv_heads"), **kw)
        self.o_proj = layers.Linear(n, d, ("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.head_dim = h
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.soft_cap = cfg.attn_logit_softcapping
        self.attention = cfg.attention
        self.dropout = layers.Dropout(cfg.attention_dropout)
        self.rope = cfg.rope
        self.local_rope = cfg.local_rope

    def _frequencies(self, positions, local):
        inv_freq = self.rope.frequencies(positions)
        if self.local_rope is None or local is False:
            return inv_freq
        local_freq = self.local_rope.frequencies(positions)
        return local_freq if local is True else jnp.where(local, local_freq, inv_freq)

    def __call__(self, x, positions, masks, local, segment_ids=None, cache=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, -1, self.head_dim)  # B T N H
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)  # B T K H
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)  # B T K H
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self._frequencies(positions, local)  # both kinds' rope scales are 1
        q, k = self.rope(q, positions, inv_freq), self.rope(k, positions, inv_freq)
        if cache is not None:
            k, v, cache = cache.update(k, v)
        out = attention.layer_attention(
            q, k, v, masks, local, self.scale, implementation=self.attention, causal=True,
            probs_dropout=self.dropout, segment_ids=segment_ids, soft_cap=self.soft_cap,
        )
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.gate_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = layers.Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = layers.Linear(f, d, ("mlp", "embed"), **kw)
        self.activation = cfg.hidden_activation

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = norm()
        if cfg.post_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_norms = cfg.post_norms

    def __call__(self, h, *, positions, masks, local=False, segment_ids=None, cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.self_attn(self.input_layernorm(h), positions, masks, local,
                                         segment_ids, cache)
        if not self.post_norms:  # Gemma: LLaMA's order
            h = h + attn
            with jax.named_scope("mlp"):
                return h + self.mlp(self.post_attention_layernorm(h)), cache
        h = h + self.post_attention_layernorm(attn)
        with jax.named_scope("mlp"):
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h, cache


class Backbone(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                         rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.layers = stack.stack_layers(
            [DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype)
             for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class Model(nnx.Module):
    """A causal language model: `model(input_ids, attention_mask)` -> logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.model = Backbone(cfg, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else layers.Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                               rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        )

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None,
                 cache=None, return_hidden: bool = False):
        """Same contract as `jaxft.models.llama.Model.__call__`."""
        positions, mask, segments, cache = attention.causal_lm_inputs(
            input_ids, attention_mask, segment_ids, positions, cache
        )
        h, cache = stack.run_decoder(
            self.model.layers, self.model.norm, self.embed(input_ids), positions=positions,
            mask=mask, segment_ids=segments, cache=cache, window=self.config.sliding_window,
            kinds=self.config.layer_kinds, remat=self.config.remat)
        if return_hidden:
            return h if cache is None else (h, cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)

    def embed(self, input_ids):
        """Token embeddings × √d, the factor rounded to the table's dtype as transformers
        rounds it (√2048 becomes 45.25 in bfloat16)."""
        table = self.model.embed_tokens.embedding[...]
        scale = jnp.asarray(self.config.hidden_size**0.5, jnp.float32).astype(table.dtype)
        rows = jnp.take(table, input_ids, axis=0) * scale
        return rows.astype(self.model.embed_tokens.dtype or table.dtype)

    def logits(self, h):
        """The output head on final hidden states, soft-capped where the config says so."""
        logits = (self.model.embed_tokens.attend(h) if self.lm_head is None
                  else self.lm_head(h))
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)

    def output_head(self) -> jax.Array | None:
        """The head as one [D, V] matrix, for the loss to fuse with the cross-entropy; None
        when logits are soft-capped (the fused loss knows no cap) or the head has an adapter."""
        if self.config.final_logit_softcapping is not None:
            return None
        if self.lm_head is None:
            return self.model.embed_tokens.as_head()
        if self.lm_head.adapter is not None:
            return None
        return self.lm_head.kernel[...].astype(self.lm_head.dtype or self.lm_head.kernel.dtype)
