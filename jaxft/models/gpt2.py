"""GPT-2 (GPT2LMHeadModel): learned positions, pre-LayerNorm blocks, a fused `c_attn`.

HF stores GPT-2's projections as `Conv1D` with weights already [in, out], so the mapping is the
identity where LLaMA needs a transpose. The output head is always the token embedding (tied).
Dropout sits where HF's does (embeddings, attention probabilities, both residual branches),
at the config's rates, and is active only in training mode (`model.train()`).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import attention, layers, stack
from jaxft.models.params import IDENTITY, TensorMapping

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and options, read from a Hugging Face `config.json`."""

    vocab_size: int
    n_positions: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False
    model_type: str = "gpt2"
    dtype: str | None = None
    remat: str = "none"
    attention: str = "auto"  # 'xla' | 'cudnn' | 'auto' (see attention.dot_product_attention)
    embd_pdrop: float = 0.1  # dropout of the embeddings, attention probabilities, residuals
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    hf_config_json: str = "{}"
    tie_word_embeddings: bool = True  # GPT-2's head is always the token embedding
    has_base_prefix = True
    num_labels = None
    routes_tokens = False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_limit(self) -> int:
        """The learned position table's length: generation stops short of it."""
        return self.n_positions

    def to_hf(self) -> dict:
        return json.loads(self.hf_config_json)

    def may_be_missing(self, path: str) -> bool:
        return False

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        if num_labels is not None:
            raise JaxftError("num_labels applies to BERT sequence classifiers, not causal LMs")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise JaxftError(
                "GPT-2 options scale_attn_by_inverse_layer_idx / "
                "reorder_and_upcast_attn are not supported"
            )
        if hf.get("activation_function", "gelu_new") not in _ACTIVATIONS:
            raise JaxftError(
                f"GPT-2 activation_function {hf['activation_function']!r} is not "
                f"supported (supported: {', '.join(_ACTIVATIONS)})"
            )
        d = hf["n_embd"]
        return cls(
            vocab_size=hf["vocab_size"],
            n_positions=hf["n_positions"],
            hidden_size=d,
            num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * d,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            embd_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1),
            resid_pdrop=hf.get("resid_pdrop", 0.1),
            hf_config_json=json.dumps(hf, sort_keys=True),
        )


_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}

HF_TENSORS = TensorMapping(
    (
        ("transformer.wte.weight", "transformer.wte.embedding", IDENTITY),
        ("transformer.wpe.weight", "transformer.wpe.embedding", IDENTITY),
        *(
            (
                f"transformer.h.{{L}}.{m}.{w}",
                f"transformer.h.{m}.{'kernel' if w == 'weight' else w}",
                IDENTITY,
            )
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            for w in ("weight", "bias")
        ),
        *(
            (f"transformer.h.{{L}}.{n}.{w}", f"transformer.h.{n}.{w}", IDENTITY)
            for n in ("ln_1", "ln_2")
            for w in ("weight", "bias")
        ),
        ("transformer.ln_f.weight", "transformer.ln_f.weight", IDENTITY),
        ("transformer.ln_f.bias", "transformer.ln_f.bias", IDENTITY),
    ),
    # The causal-mask buffers of old checkpoints, and the head, which is the embedding.
    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    base_prefix="transformer.",
)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        d = cfg.hidden_size
        kw = dict(bias=True, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.c_attn = layers.Linear(d, 3 * d, ("embed", "qkv"), **kw)
        self.c_proj = layers.Linear(d, d, ("heads", "embed"), **kw)
        self.num_heads = cfg.num_attention_heads
        self.attention = cfg.attention
        self.attn_dropout = layers.Dropout(cfg.attn_pdrop)
        self.resid_dropout = layers.Dropout(cfg.resid_pdrop)

    def __call__(self, x, mask, segment_ids=None, cache=None):
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x B T D
        q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
        if cache is not None:
            k, v, cache = cache.update(k, v)
        out = attention.dot_product_attention(q, k, v, mask, (d // self.num_heads) ** -0.5,
                                           implementation=self.attention, causal=True,
                                           probs_dropout=self.attn_dropout,
                                           segment_ids=segment_ids)
        return self.resid_dropout(self.c_proj(out.reshape(b, t, d))), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(bias=True, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.c_fc = layers.Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.c_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.activation = cfg.activation
        self.dropout = layers.Dropout(cfg.resid_pdrop)

    def __call__(self, x):
        return self.dropout(self.c_proj(_ACTIVATIONS[self.activation](self.c_fc(x))))


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        eps = cfg.layer_norm_epsilon
        self.ln_1 = layers.LayerNorm(cfg.hidden_size, eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.ln_2 = layers.LayerNorm(cfg.hidden_size, eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, h, *, mask, segment_ids=None, cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.attn(self.ln_1(h), mask, segment_ids, cache)
        h = h + attn
        with jax.named_scope("mlp"):
            h = h + self.mlp(self.ln_2(h))
        return h, cache


class Transformer(nnx.Module):
    """HF's `transformer.*`."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.wte = layers.Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.wpe = layers.Embed(cfg.n_positions, cfg.hidden_size, (None, "embed"), **kw)
        self.drop = layers.Dropout(cfg.embd_pdrop)
        self.h = stack.stack_layers(
            [Block(cfg, rngs=rngs, param_dtype=param_dtype) for _ in range(cfg.num_hidden_layers)]
        )
        self.ln_f = layers.LayerNorm(
            cfg.hidden_size, cfg.layer_norm_epsilon, param_dtype=param_dtype
        )


class Model(nnx.Module):
    """GPT2LMHeadModel: `model(input_ids, attention_mask)` -> logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.transformer = Transformer(cfg, rngs=rngs, param_dtype=param_dtype)

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
        """Same contract as `jaxft.models.llama.Model.__call__`."""
        positions, mask, segments, cache = attention.causal_lm_inputs(
            input_ids, attention_mask, segment_ids, positions, cache
        )
        h = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # B T D
        h = self.transformer.drop(h)
        h, layer_cache = stack.scan_layers(
            self.transformer.h,
            h,
            remat=self.config.remat,
            cache=None if cache is None else cache.layers,
            mask=mask,
            segment_ids=segments,
        )
        h = self.transformer.ln_f(h)
        if cache is not None:
            cache = cache.replace(layers=layer_cache)
        if return_hidden:
            return h if cache is None else (h, cache)
        logits = self.logits(h)  # B T V
        return logits if cache is None else (logits, cache)

    def logits(self, h):
        """The output head (the tied token embedding): [B, T, D] -> [B, T, V]."""
        return self.transformer.wte.attend(h)

    def output_head(self) -> jax.Array:
        """The head as one [D, V] matrix, so the loss can fuse it with the cross-entropy."""
        return self.transformer.wte.as_head()
