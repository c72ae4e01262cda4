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

Layers that keep a dense MLP among the sparse ones (Qwen-MoE's `mlp_only_layers` and
`decoder_sparse_step`) are a second stack, `model.dense_layers`: a scan needs alike layers, so
the model runs each stretch of consecutive alike layers as one scan over a slice of its stack,
and the tensor table places each checkpoint layer in its stack (`Config.placement`).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import attention, experts, layers, llama, stack
from jaxft.models.params import LayerPlacement

# The dense model each MoE model_type extends: its attention and config fields are read as
# that model's. gpt-oss's attention is LLaMA's with biases and sinks.
DENSE_TWIN = {"qwen3_moe": "qwen3", "mixtral": "mistral", "gpt_oss": "llama"}


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    """A LLaMA-family config plus its experts. `intermediate_size` is each expert's width;
    `dense_layers` keep a dense MLP of width `dense_intermediate_size`."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    output_router_logits: bool = False  # transformers adds the aux loss only when set
    router_aux_loss_coef: float = 0.001
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0
    # gpt-oss: biased experts and router, alternating gate/up columns, a clamped SwiGLU
    expert_bias: bool = False
    expert_unit: experts.GatedUnit = experts.SWIGLU
    router_name: str = "gate"

    routes_tokens = True

    @property
    def sparse_layers(self) -> int:
        """How many layers route to experts."""
        return self.num_hidden_layers - len(self.dense_layers)

    @property
    def expert_params(self) -> int:
        """Parameters of every layer's experts (gate, up and down projections, and their
        biases when they have them)."""
        d, f = self.hidden_size, self.intermediate_size
        per_expert = 3 * d * f + (2 * f + d if self.expert_bias else 0)
        return self.sparse_layers * self.num_experts * per_expert

    @property
    def routed_params_per_token(self) -> int:
        """The router and expert weights one token is multiplied by: every router, and
        `num_experts_per_tok` experts in each sparse layer (what the FLOPs count)."""
        router = self.sparse_layers * self.hidden_size * self.num_experts
        return router + self.expert_params * self.num_experts_per_tok // self.num_experts

    @property
    def placement(self) -> LayerPlacement | None:
        """Which stack holds each layer, when some are dense (None: one stack holds all)."""
        if not self.dense_layers:
            return None
        return LayerPlacement(SPARSE_STACK, tuple(
            DENSE_STACK if i in self.dense_layers else SPARSE_STACK
            for i in range(self.num_hidden_layers)))

    @property
    def layer_runs(self) -> tuple[tuple[bool, int, int, int], ...]:
        """The stretches of consecutive alike layers, in order: (sparse, first layer, end,
        index of the first layer in its stack)."""
        runs, seen = [], {True: 0, False: 0}
        for i in range(self.num_hidden_layers):
            sparse = i not in self.dense_layers
            if runs and runs[-1][0] == sparse:
                runs[-1][2] = i + 1
            else:
                runs.append([sparse, i, i + 1, seen[sparse]])
            seen[sparse] += 1
        return tuple(tuple(run) for run in runs)

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
            "norm_topk_prob": model_type in ("mixtral", "gpt_oss")
                              or bool(hf.get("norm_topk_prob")),
            "output_router_logits": bool(hf.get("output_router_logits", False)),
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
            "dense_layers": tuple(_dense_layers(hf)),
            "dense_intermediate_size": int(hf["intermediate_size"]),
            **(_gpt_oss_fields(hf) if model_type == "gpt_oss" else {}),
        })


def _gpt_oss_fields(hf: dict) -> dict:
    """What gpt-oss adds to a LLaMA-style decoder: q/k/v/o biases (`attention_bias`, on by
    default), attention sinks, a sliding window on the layers `layer_types` names (every other
    one, from the first, by default), and biased experts with a clamped SwiGLU."""
    layers = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(layers)]
    window = hf.get("sliding_window")
    local = tuple(kind == "sliding_attention" for kind in kinds)
    limit = hf.get("swiglu_limit", 7.0)
    bias = bool(hf.get("attention_bias", True))
    return {
        "qkv_bias": bias, "o_bias": bias, "attention_sinks": True,
        "sliding_window": window if window and any(local) else None,
        "local_layers": local if window and any(local) else None,
        "expert_bias": True, "router_name": "router",
        "expert_unit": experts.GatedUnit(interleaved=True,
                                         alpha=float(hf.get("swiglu_alpha", 1.702)),
                                         limit=None if limit is None else float(limit)),
    }


def _dense_layers(hf: dict) -> list[int]:
    """Qwen-MoE's layers that keep a dense MLP: listed in `mlp_only_layers`, or off the
    `decoder_sparse_step` rhythm (layer i routes when (i + 1) % step == 0)."""
    step = hf.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise JaxftError(f"decoder_sparse_step must be a whole number of at least 1, got {step!r}")
    only = hf.get("mlp_only_layers") or ()
    layers = hf["num_hidden_layers"]
    if not all(isinstance(i, int) and 0 <= i < layers for i in only):
        raise JaxftError(f"mlp_only_layers must list layer indices below the {layers} layers, "
                         f"got {list(only)!r}")
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    if len(dense) == layers:
        raise JaxftError("no layer routes to experts (mlp_only_layers / decoder_sparse_step "
                         "make every layer dense): load it as the dense model it is")
    return dense


SPARSE_STACK = "model.layers."  # where the tensor table writes every layer
DENSE_STACK = "model.dense_layers."


class DecoderLayer(nnx.Module):
    """A layer whose MLP routes to experts; `sparse=False`: a dense (`llama.MLP`) layer of the
    same model, whose calls return no routing."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype, sparse: bool = True):
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                              param_dtype=param_dtype)
        self.self_attn = llama.Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                       param_dtype=param_dtype)
        if sparse:
            self.mlp = experts.SparseMoeBlock(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                cfg.norm_topk_prob, rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype,
                bias=cfg.expert_bias, unit=cfg.expert_unit, router_name=cfg.router_name)
        else:
            self.mlp = llama.MLP(
                dataclasses.replace(cfg, intermediate_size=cfg.dense_intermediate_size),
                rngs=rngs, param_dtype=param_dtype)
        self.sparse = sparse

    def __call__(self, h, *, positions, masks, counted, local=False, segment_ids=None,
                 cache=None):
        with jax.named_scope("attention"):
            attn, cache = self.self_attn(self.input_layernorm(h), positions, masks, local,
                                         segment_ids, cache)
        h = h + attn
        if not self.sparse:
            with jax.named_scope("mlp"):
                return h + self.mlp(self.post_attention_layernorm(h)), (cache, None)
        with jax.named_scope("experts"):
            out, stats = self.mlp(self.post_attention_layernorm(h), counted)
        return h + out, (cache, stats)


class Backbone(nnx.Module):
    """HF's `model.*`: embeddings, the stacked decoder layers, the final norm."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, param_dtype):
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                         rngs=rngs, param_dtype=param_dtype, dtype=cfg.dtype)
        self.layers = stack.stack_layers([DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype)
                                          for _ in range(cfg.sparse_layers)])
        self.dense_layers = None if not cfg.dense_layers else stack.stack_layers([
            DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, sparse=False)
            for _ in cfg.dense_layers])
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
        h = self.model.embed_tokens(input_ids)  # B T D
        caches, stats = [], []
        runs = self.config.layer_runs
        whole = len(runs) == 1  # one scan over one stack: nothing to slice

        def part(tree, start, end):
            return tree if whole or tree is None else jax.tree.map(lambda x: x[start:end], tree)

        for sparse, start, end, first in runs:
            run_kinds = kinds if isinstance(kinds, bool) else kinds[start:end]
            alike = isinstance(run_kinds, bool)
            h, (run_cache, run_stats) = stack.scan_layers(
                self.model.layers if sparse else self.model.dense_layers, h,
                layers=None if whole else slice(first, first + end - start),
                remat=self.config.remat,
                cache=part(None if cache is None else cache.layers, start, end),
                per_layer=None if alike else {"local": jnp.asarray(run_kinds)},
                **({"local": run_kinds} if alike else {}),
                positions=positions, masks=masks, segment_ids=segments, counted=counted)
            caches.append(run_cache)
            if sparse:
                stats.append(experts.RouterStats(*(jnp.sum(s, axis=0) for s in run_stats)))
        h = self.model.norm(h)
        if cache is not None:
            cache = cache.replace(layers=caches[0] if len(caches) == 1 else jax.tree.map(
                lambda *parts: jnp.concatenate(parts), *caches))
        out = h if return_hidden else self.logits(h)
        out = out if cache is None else (out, cache)
        if not return_router:
            return out
        return out, jax.tree.map(lambda *s: sum(s), *stats)
