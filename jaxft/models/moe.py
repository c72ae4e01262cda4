"""The mixture-of-experts decoders: a LLaMA-family decoder whose MLP is `experts.SparseMoeBlock`.

Qwen3-MoE and Mixtral are Qwen3 and Mistral (the same attention, norms, RoPE and windows, so
`llama.Attention` serves them) with each layer's MLP replaced by a router and E experts. What
differs between them is data: how many experts and of what width, whether the top-k weights are
renormalised (Mixtral always, Qwen `norm_topk_prob`), and the names of their tensors, which
their own modules (`qwen3_moe`, `mixtral`) declare.

A call returns what a dense decoder returns; `return_router=True` also returns the routing
statistics, from which `jaxft.train_step` computes the load-balancing loss (added to the
training loss with `router_aux_loss_coef` as transformers adds it when `output_router_logits`
is on) and logs it with each expert's share of the tokens.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import attention, experts, layers, llama, stack

# The dense model each MoE model_type extends: its attention and config fields are read as
# that model's.
DENSE_TWIN = {"qwen3_moe": "qwen3", "mixtral": "mistral"}


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    """A LLaMA-family config plus its experts. `intermediate_size` is each expert's width."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    output_router_logits: bool = False  # transformers adds the aux loss only when set
    router_aux_loss_coef: float = 0.001

    routes_tokens = True

    @property
    def expert_params(self) -> int:
        """Parameters of every layer's experts (gate, up and down projections)."""
        return self.num_hidden_layers * self.num_experts * 3 * self.hidden_size * \
            self.intermediate_size

    @property
    def routed_params_per_token(self) -> int:
        """The router and expert weights one token is multiplied by: every router, and
        `num_experts_per_tok` experts in each layer (what the FLOPs count)."""
        router = self.num_hidden_layers * self.hidden_size * self.num_experts
        return router + self.expert_params * self.num_experts_per_tok // self.num_experts

    @property
    def aux_loss_coef(self) -> float:
        """The weight of the load-balancing loss in the training loss (0: logged only)."""
        return self.router_aux_loss_coef if self.output_router_logits else 0.0

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> Config:
        model_type = hf["model_type"]
        count = hf.get("num_local_experts", hf.get("num_experts"))
        k = hf.get("num_experts_per_tok")
        if not isinstance(count, int) or count <= 0:
            raise JaxftError(f"num_experts must be a positive whole number, got {count!r}")
        if not isinstance(k, int) or not 0 < k <= count:
            raise JaxftError(f"num_experts_per_tok must be between 1 and the {count} experts, "
                             f"got {k!r}")
        dense_layers = _dense_layers(hf)
        if dense_layers:
            raise JaxftError(
                f"layer {dense_layers[0]} is a dense MLP layer (mlp_only_layers / "
                "decoder_sparse_step); jaxft loads mixture-of-experts models whose every layer "
                "routes to experts")
        width = hf.get("moe_intermediate_size") or hf["intermediate_size"]
        dense = llama.Config.from_hf({**hf, "model_type": DENSE_TWIN[model_type],
                                      "intermediate_size": width})
        inherited = {f.name: getattr(dense, f.name) for f in dataclasses.fields(llama.Config)}
        return cls(**{
            **inherited,
            "model_type": model_type,
            "hf_config_json": json.dumps(hf, sort_keys=True),
            "num_experts": count,
            "num_experts_per_tok": k,
            "norm_topk_prob": model_type == "mixtral" or bool(hf.get("norm_topk_prob")),
            "output_router_logits": bool(hf.get("output_router_logits", False)),
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        })


def _dense_layers(hf: dict) -> list[int]:
    """Qwen-MoE's layers that keep a dense MLP: listed in `mlp_only_layers`, or off the
    `decoder_sparse_step` rhythm (layer i routes when (i + 1) % step == 0)."""
    step = hf.get("decoder_sparse_step", 1) or 1
    only = set(hf.get("mlp_only_layers") or ())
    return [i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                              param_dtype=param_dtype)
        self.self_attn = llama.Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                       param_dtype=param_dtype)
        self.mlp = experts.SparseMoeBlock(
            cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.norm_topk_prob, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)

    def __call__(self, h, *, positions, masks, counted, local=False, segment_ids=None,
                 cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.self_attn(self.input_layernorm(h), positions, masks, local,
                                         segment_ids, cache)
        h = h + attn
        with jax.named_scope("experts"):
            out, stats = self.mlp(self.post_attention_layernorm(h), counted)
        return h + out, (cache, stats)


class Backbone(nnx.Module):
    """HF's `model.*`: embeddings, the stacked decoder layers, the final norm."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                         rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.layers = stack.stack_layers([DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype)
                                          for _ in range(cfg.num_hidden_layers)])
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class Model(llama.Model):
    """A mixture-of-experts causal LM: `model(input_ids, attention_mask)` -> logits [B, T, V]."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = cfg
        self.model = Backbone(cfg, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else layers.Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs,
            param_dtype=param_dtype, dtype=cfg.dtype))

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None,
                 cache=None, return_hidden: bool = False, return_router: bool = False):
        """As `llama.Model.__call__`; with `return_router` the output comes as a pair whose
        second item is the routing of the tokens that are not padding (those of
        `attention_mask`, or of a segment), summed over the layers (`experts.RouterStats`:
        what transformers' `load_balancing_loss_func` is computed from)."""
        counted = (segment_ids > 0 if segment_ids is not None
                   else jnp.ones(input_ids.shape, bool) if attention_mask is None
                   else attention_mask > 0)
        positions, mask, segments, cache = attention.causal_lm_inputs(
            input_ids, attention_mask, segment_ids, positions, cache)
        masks = attention.decoder_masks(mask, positions, cache, self.config.sliding_window)
        kinds = self.config.layer_kinds
        alike = isinstance(kinds, bool)
        h, (layer_cache, stats) = stack.scan_layers(
            self.model.layers, self.model.embed_tokens(input_ids),  # B T D
            remat=self.config.remat, cache=None if cache is None else cache.layers,
            per_layer=None if alike else {"local": jnp.asarray(kinds)},
            **({"local": kinds} if alike else {}),
            positions=positions, masks=masks, segment_ids=segments, counted=counted)
        h = self.model.norm(h)
        if cache is not None:
            cache = cache.replace(layers=layer_cache)
        out = h if return_hidden else self.logits(h)
        out = out if cache is None else (out, cache)
        if not return_router:
            return out
        return out, experts.RouterStats(*(jnp.sum(s, axis=0) for s in stats))
