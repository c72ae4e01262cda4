"""BERT: BertModel (hidden states) and BertForSequenceClassification (class logits).

Post-LayerNorm encoder blocks with learned absolute positions and token types. Both
architectures share one module tree under HF's `bert.` prefix; a BertModel checkpoint, whose
names lack that prefix, loads into it unchanged, and a classifier built on top of it gets a fresh
head. Dropout sits where HF's does (embeddings, attention probabilities, both residual
branches, before the classifier), at the config's rates, active only in training mode.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import attention, layers, stack
from jaxft.models.params import IDENTITY, TRANSPOSE, TensorMapping

MODEL_TYPES = ("bert",)
CLASSIFIER = "BertForSequenceClassification"


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and options, read from a Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int | None = None  # None: BertModel (hidden states); else a sequence classifier
    model_type: str = "bert"
    dtype: str | None = None
    remat: str = "none"
    attention: str = "auto"  # 'xla' | 'cudnn' | 'auto' (see attention.dot_product_attention)
    hidden_dropout_prob: float = 0.1  # embeddings and both residual branches
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    hf_config_json: str = "{}"
    tie_word_embeddings: bool = False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    routes_tokens = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_limit(self) -> int:
        return self.max_position_embeddings

    @property
    def has_base_prefix(self) -> bool:
        """BertModel checkpoints name tensors without the `bert.` prefix; heads keep it."""
        return self.num_labels is not None

    def to_hf(self) -> dict:
        hf = json.loads(self.hf_config_json)
        if self.num_labels is not None:
            hf["architectures"] = [CLASSIFIER]
            id2label = hf.get("id2label") or {}
            if len(id2label) != self.num_labels:
                id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["id2label"] = {str(k): v for k, v in id2label.items()}
            hf["label2id"] = {v: int(k) for k, v in hf["id2label"].items()}
        return hf

    def may_be_missing(self, path: str) -> bool:
        """A classifier built on an encoder checkpoint starts from a fresh head."""
        return self.num_labels is not None and path.startswith(("classifier.", "bert.pooler."))

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise JaxftError(
                f"BERT position_embedding_type {hf['position_embedding_type']!r} "
                "is not supported (supported: absolute)"
            )
        if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise JaxftError(
                f"BERT hidden_act {hf['hidden_act']!r} is not supported "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        is_classifier = CLASSIFIER in (hf.get("architectures") or [])
        if num_labels is None and is_classifier:
            num_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            num_labels=num_labels,
            hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"),
            hf_config_json=json.dumps(hf, sort_keys=True),
        )


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dense(hf: str, path: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{hf}.weight", f"{path}.kernel", TRANSPOSE), (f"{hf}.bias", f"{path}.bias", IDENTITY))


def _norm(hf: str, path: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{hf}.weight", f"{path}.weight", IDENTITY), (f"{hf}.bias", f"{path}.bias", IDENTITY))


_LAYER = "bert.encoder.layer.{L}"
_STACK = "bert.encoder.layer"
HF_TENSORS = TensorMapping(
    (
        *(
            (f"bert.embeddings.{n}.weight", f"bert.embeddings.{n}.embedding", IDENTITY)
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        ),
        *_norm("bert.embeddings.LayerNorm", "bert.embeddings.LayerNorm"),
        *(
            e
            for n in ("query", "key", "value")
            for e in _dense(f"{_LAYER}.attention.self.{n}", f"{_STACK}.attention.self.{n}")
        ),
        *_dense(f"{_LAYER}.attention.output.dense", f"{_STACK}.attention.output.dense"),
        *_norm(f"{_LAYER}.attention.output.LayerNorm", f"{_STACK}.attention.output.LayerNorm"),
        *_dense(f"{_LAYER}.intermediate.dense", f"{_STACK}.intermediate.dense"),
        *_dense(f"{_LAYER}.output.dense", f"{_STACK}.output.dense"),
        *_norm(f"{_LAYER}.output.LayerNorm", f"{_STACK}.output.LayerNorm"),
        *_dense("bert.pooler.dense", "bert.pooler.dense"),
        *_dense("classifier", "classifier"),
    ),
    # Buffers, and pre-training heads a fine-tuned classifier does not use.
    ignored=(r"bert\.embeddings\.position_ids", r"cls\..*", r"bert\.embeddings\.token_type_ids"),
    base_prefix="bert.",
    renames=((".gamma", ".weight"), (".beta", ".bias")),
)


class Dense(nnx.Module):
    """HF's `*.dense` wrapper modules, kept so names match."""

    def __init__(self, d_in, d_out, axes, *, rngs, param_dtype, dtype):
        self.dense = layers.Linear(
            d_in, d_out, axes, bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype
        )


class SelfAttention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        d = cfg.hidden_size
        kw = dict(bias=True, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.query = layers.Linear(d, d, ("embed", "heads"), **kw)
        self.key = layers.Linear(d, d, ("embed", "heads"), **kw)
        self.value = layers.Linear(d, d, ("embed", "heads"), **kw)
        self.dropout = layers.Dropout(cfg.attention_probs_dropout_prob)


class AttentionOutput(Dense):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        super().__init__(
            cfg.hidden_size,
            cfg.hidden_size,
            ("heads", "embed"),
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=cfg.dtype,
        )
        self.LayerNorm = layers.LayerNorm(
            cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype
        )
        self.dropout = layers.Dropout(cfg.hidden_dropout_prob)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        self.self = SelfAttention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.output = AttentionOutput(cfg, rngs=rngs, param_dtype=param_dtype)
        self.num_heads = cfg.num_attention_heads
        self.attention = cfg.attention

    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = (
            getattr(self.self, n)(x).reshape(b, t, self.num_heads, d // self.num_heads)
            for n in ("query", "key", "value")
        )  # B T N H
        out = attention.dot_product_attention(q, k, v, mask, (d // self.num_heads) ** -0.5,
                                           implementation=self.attention,
                                           probs_dropout=self.self.dropout)
        out = self.output.dropout(self.output.dense(out.reshape(b, t, d)))
        return self.output.LayerNorm(x + out)


class Layer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.attention = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.output.LayerNorm = layers.LayerNorm(
            cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype
        )
        self.output.dropout = layers.Dropout(cfg.hidden_dropout_prob)
        self.activation = cfg.hidden_act

    def __call__(self, h, *, mask, cache=None):
        with jax.named_scope("attention"):
            h = self.attention(h, mask)
        with jax.named_scope("mlp"):
            inner = _ACTIVATIONS[self.activation](self.intermediate.dense(h))
            h = self.output.LayerNorm(h + self.output.dropout(self.output.dense(inner)))
        return h, cache


class Embeddings(nnx.Module):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.word_embeddings = layers.Embed(
            cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw
        )
        self.position_embeddings = layers.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), **kw
        )
        self.token_type_embeddings = layers.Embed(
            cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), **kw
        )
        self.LayerNorm = layers.LayerNorm(
            cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype
        )
        self.dropout = layers.Dropout(cfg.hidden_dropout_prob)


class Encoder(nnx.Module):
    def __init__(self, cfg: Config, *, rngs, param_dtype):
        self.layer = stack.stack_layers(
            [Layer(cfg, rngs=rngs, param_dtype=param_dtype) for _ in range(cfg.num_hidden_layers)]
        )


class Bert(nnx.Module):
    """HF's `bert.*` (BertModel)."""

    def __init__(self, cfg: Config, *, rngs, param_dtype):
        self.embeddings = Embeddings(cfg, rngs=rngs, param_dtype=param_dtype)
        self.encoder = Encoder(cfg, rngs=rngs, param_dtype=param_dtype)
        self.pooler = Dense(
            cfg.hidden_size,
            cfg.hidden_size,
            ("embed", "embed_out"),
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=cfg.dtype,
        )


class Model(nnx.Module):
    """`model(input_ids, attention_mask, token_type_ids)`: hidden states [B, T, D] for a
    BertModel, class logits [B, num_labels] for a sequence classifier."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.bert = Bert(cfg, rngs=rngs, param_dtype=param_dtype)
        self.classifier = (
            None
            if cfg.num_labels is None
            else layers.Linear(
                cfg.hidden_size,
                cfg.num_labels,
                ("embed", None),
                bias=True,
                rngs=rngs,
                param_dtype=param_dtype,
                dtype=cfg.dtype,
            )
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = layers.Dropout(rate if cfg.num_labels is not None else 0.0)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        segment_ids=None,
        positions=None,
        return_hidden: bool = False,
    ):
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is None:
            # HF masks only the keys: every query, padding included, sees all real tokens.
            mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, t, t))
        else:
            mask = attention.attention_mask(segment_ids, segment_ids, causal=False)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        emb = self.bert.embeddings
        h = (
            emb.word_embeddings(input_ids)
            + emb.token_type_embeddings(token_type_ids)
            + emb.position_embeddings(positions)
        )
        h = emb.dropout(emb.LayerNorm(h))  # B T D
        h, _ = stack.scan_layers(self.bert.encoder.layer, h, remat=self.config.remat, mask=mask)
        if return_hidden or self.classifier is None:
            return h
        pooled = jnp.tanh(self.bert.pooler.dense(h[:, 0]))  # B D
        return self.classifier(self.dropout(pooled))  # B num_labels
