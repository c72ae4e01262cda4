"""LoRA as a partition of the parameter pytree.

`apply_lora` attaches a `LoRA` adapter to every targeted `Linear`. Its factors are `nnx.LoRAParam`
variables, so one filter (`trainable_filter`) splits the model state into what trains and what
stays frozen, and the optimizer never sees the frozen base. B starts at zero, so a fresh adapter
leaves every logit bitwise equal to the base model's.

Targets use Hugging Face module names, as PEFT's `target_modules` does: a list of names matches
any module whose dotted path ends with one of them (`q_proj`, `c_attn`, `query`); a single
string is a regular expression matched against full Hugging Face paths
(`model.layers.3.self_attn.q_proj`). A mixture of experts' expert weights are parameters, not
projections: `target_parameters` names them as PEFT's does (`mlp.experts.gate_up_proj`), and
each gets an `ExpertLoRA`, one low-rank pair per expert; `mlp.gate.weight` puts a `LoRA` on the
routers. On those models `targets` that name the MLP's projections or the router, or
`all-linear`, mean what PEFT makes of them (`peft_moe_targets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import models
from jaxft.errors import JaxftError
from jaxft.kernels.grouped_matmul import grouped_matmul
from jaxft.models import experts
from jaxft.models.layers import Dropout, Linear, is_output_head, linear_modules


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What `apply_lora` builds: PEFT's LoraConfig fields, with the same meaning."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature
    rank_pattern: tuple[tuple[str, int], ...] = ()  # (module name, rank) overrides
    alpha_pattern: tuple[tuple[str, float], ...] = ()  # (module name, alpha) overrides
    modules_to_save: tuple[str, ...] = ()  # non-LoRA modules that train fully (e.g. classifier)
    # Expert weights (PEFT's target_parameters): names that end HF parameter paths
    target_parameters: tuple[str, ...] = ()

    def rank_for(self, name: str) -> int:
        return _override(self.rank_pattern, name, self.rank)

    def scale(self, rank: int, alpha: float | None = None) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (stable at high rank)."""
        alpha = self.alpha if alpha is None else alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def scale_for(self, name: str) -> float:
        """The scale of the adapter on `name`, from its rank and alpha (patterns included)."""
        return self.scale(self.rank_for(name), _override(self.alpha_pattern, name,
                                                              self.alpha))


def _override(pattern: tuple[tuple[str, Any], ...], name: str, default: Any) -> Any:
    """The value of the first (name, value) whose name is `name` or ends it after a dot."""
    for key, value in pattern:
        if name == key or name.endswith("." + key):
            return value
    return default


class LoRA(nnx.Module):
    """The low-rank update `dropout(x) @ A @ B * scale` added to a frozen projection.

    With DoRA (`magnitude`), PEFT's formulation: the adapted weight W + scale·A·B is rescaled to
    a trained norm per output feature, m / ‖W + scale·A·B‖ (the norm over the inputs, detached
    from the gradient as the DoRA paper and PEFT do), which adds
    `(m/‖·‖ - 1) · x W + m/‖·‖ · scale · x A B` to the projection.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float, *,
                 axes: tuple, layers: int | None, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dora: bool = False):
        lead = () if layers is None else (layers,)
        lead_axes = () if layers is None else ("layers",)
        # PEFT's default: kaiming_uniform(a=sqrt(5)) on A[r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*lead, d_in, rank), param_dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, axes=(*lead_axes, axes[0], None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), param_dtype),
                                    axes=(*lead_axes, None, axes[1]))
        # PEFT's lora_magnitude_vector; `apply_lora` sets it to ‖W‖ (B is zero at first).
        self.magnitude = (nnx.LoRAParam(jnp.ones((*lead, d_out), param_dtype),
                                        axes=(*lead_axes, axes[1])) if dora else None)
        self.scale = scale
        # On from creation, as PEFT's lora_dropout is in training mode; `model.eval()` turns it
        # off with the model's own dropout (which `from_pretrained` has already turned off).
        self.dropout = Dropout(dropout, layers=layers)

    def __call__(self, x: jax.Array, *, weight: jax.Array | None = None,
                 projected: jax.Array | None = None) -> jax.Array:
        """What adds to the projection of `x`; DoRA also needs the projection's `weight` [in,
        out] and its output before the bias, `projected` = x W."""
        dropped = self.dropout(x)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        update = (dropped @ a @ b) * jnp.asarray(self.scale, x.dtype)
        if self.magnitude is None:
            return update
        norm = jax.lax.stop_gradient(adapted_norm(weight, self.lora_a[...], self.lora_b[...],
                                                  self.scale))
        rescale = (self.magnitude[...].astype(jnp.float32) / norm).astype(update.dtype)
        if self.dropout.active:  # PEFT projects the dropped input again for the DoRA term
            projected = dropped.astype(weight.dtype) @ weight
        return (rescale - 1) * projected.astype(update.dtype) + rescale * update


class ExpertLoRA(nnx.Module):
    """PEFT's LoRA on a stacked expert weight (`target_parameters`): each expert e adds
    `x @ A_e @ B_e * scale` to its projection, A [E, in, r] and B [E, r, out]. PEFT holds them
    as one `lora_A` [E·r, in] and one `lora_B` [out, r·E] (`jaxft.hf.adapters` converts);
    like PEFT's, it takes no dropout and no DoRA."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int, scale: float, *,
                 axes: tuple, layers: int | None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        lead = () if layers is None else (layers,)
        lead_axes = () if layers is None else ("layers",)
        # PEFT's kaiming_uniform(a=sqrt(5)) on lora_A [E·r, in]: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*lead, num_experts, d_in, rank), param_dtype,
                               -bound, bound)
        self.lora_a = nnx.LoRAParam(a, axes=(*lead_axes, "experts", axes[0], None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, num_experts, rank, d_out), param_dtype),
                                    axes=(*lead_axes, "experts", None, axes[1]))
        self.scale = scale

    def __call__(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """The addition to the projection of `rows` [M, in], grouped by expert."""
        a, b = self.lora_a[...].astype(rows.dtype), self.lora_b[...].astype(rows.dtype)
        low = grouped_matmul(rows, a, group_sizes)
        return grouped_matmul(low, b, group_sizes) * jnp.asarray(self.scale, rows.dtype)

    def delta(self) -> jax.Array:
        """scale·A·B per expert (and layer), float32, in the weight's [.., E, in, out] layout."""
        return jnp.einsum("...ir,...ro->...io", self.lora_a[...].astype(jnp.float32),
                          self.lora_b[...].astype(jnp.float32)) * self.scale


def adapted_norm(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """‖W + scale·A·B‖ over the inputs, per output feature (and layer), in float32: DoRA's
    denominator, PEFT's `get_weight_norm`."""
    adapted = weight.astype(jnp.float32) + scale * jnp.einsum(
        "...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return column_norms(adapted)


def column_norms(weight: jax.Array) -> jax.Array:
    """The L2 norm over the inputs of a [.., in, out] weight: one per output feature."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=-2))


def weight_norms(linear: Linear) -> jax.Array:
    """‖W‖ over the inputs, per output feature: DoRA's starting magnitude. Computed one layer
    at a time, so a stacked (or packed) kernel is never held whole in float32."""
    if linear.packed:
        graphdef, state = nnx.split(linear.kernel)

        def dense(s):
            return nnx.merge(graphdef, s).dequantize(jnp.float32)
    else:
        state = linear.kernel[...]

        def dense(w):
            return w.astype(jnp.float32)

    def norm(s):
        return column_norms(dense(s))

    if len(linear.kernel_shape) == 3:
        return jax.jit(lambda st: jax.lax.map(norm, st))(state)
    return jax.jit(norm)(state)


def hf_paths(model: nnx.Module, path: str) -> list[str]:
    """The Hugging Face module paths a jaxft module path of `model` stands for (one per layer
    when it sits in the stacked layers), read from the family's tensor table."""
    return models.tensor_table(model.config).layer_paths(path, model.config.num_hidden_layers)


def has_adapters(model: nnx.Module) -> bool:
    """Whether any projection, expert weight or router of `model` carries a LoRA adapter."""
    return (any(linear.adapter is not None for _, linear in linear_modules(model))
            or bool(expert_adapters(model)) or bool(router_adapters(model)))


def router_adapters(model: nnx.Module) -> dict[str, LoRA]:
    """{jaxft path of the router: adapter} for every adapted router."""
    return {path: module.adapter for path, module in experts.router_modules(model)
            if module.adapter is not None}


def expert_adapters(model: nnx.Module) -> dict[tuple[str, str], ExpertLoRA]:
    """{(jaxft path of the experts, weight name): adapter} for every adapted expert weight."""
    return {(path, name): module.adapter(name)
            for path, module in experts.expert_modules(model)
            for name in experts.PARAMETERS if module.adapter(name) is not None}


@contextlib.contextmanager
def adapters_off(model: nnx.Module) -> Iterator[None]:
    """Every adapter of `model` switched off inside the block (projections', experts' and
    routers'), as PEFT's `disable_adapter` does, and back on after it."""
    expert_homes = dict(experts.expert_modules(model))
    router_homes = dict(experts.router_modules(model))
    on_linears = [(linear, linear.adapter) for _, linear in linear_modules(model)
                  if linear.adapter is not None]
    on_experts = [(expert_homes[path], name, adapter)
                  for (path, name), adapter in expert_adapters(model).items()]
    on_routers = [(router_homes[path], adapter) for path, adapter in router_adapters(model).items()]
    for module, _ in on_linears + on_routers:
        module.adapter = None
    for module, name, _ in on_experts:
        module.set_adapter(name, None)
    try:
        yield
    finally:
        for module, adapter in on_linears + on_routers:
            module.adapter = adapter
        for module, name, adapter in on_experts:
            module.set_adapter(name, adapter)


ALL_LINEAR = "all-linear"


def is_all_linear(targets: str | Sequence[str]) -> bool:
    """PEFT's shorthand for every linear layer but the output head (any letter case)."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def target_matches(targets: str | Sequence[str], name: str) -> bool:
    """PEFT's rule for one Hugging Face module name (`target_modules`, `exclude_modules`): a
    string is a regex that must match the whole name; a list matches a name equal to, or
    ending in '.' plus, one of its entries."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _matches(cfg: LoraConfig, model: nnx.Module, path: str) -> bool:
    if is_all_linear(cfg.targets):
        return not is_output_head(path)
    if not isinstance(cfg.targets, str) and path in cfg.targets:  # a jaxft path, as adapters
        return True  # passes the projections a PEFT adapter names
    hits = [target_matches(cfg.targets, name) for name in hf_paths(model, path)]
    if any(hits) and not all(hits):
        raise JaxftError(f"lora.targets {_show(cfg.targets)} select only some layers of "
                         f"{path}; adapters apply to all layers of a module or none")
    return all(hits)


# The target_modules names PEFT (with transformers 5) reads on a mixture of experts as expert
# and router weights, which transformers 4 held as projections (PEFT's
# `_MOE_TARGET_MODULE_MAPPING`): a dense layer's MLP of the same names is then not adapted.
MOE_TARGET_NAMES: dict[str, dict[str, str]] = {
    "qwen3_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj",
                  "up_proj": "gate_up_proj", "down_proj": "down_proj"},
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj",
                "w2": "down_proj"},
}
FUSED = "gate_up_proj"  # the gate and up projections, one weight: its adapter has 2r and 2α


def peft_moe_targets(cfg: LoraConfig, model: nnx.Module) -> LoraConfig:
    """`cfg` as PEFT rewrites it for a mixture of experts (`_convert_peft_config_moe`).

    `all-linear` becomes the projections' names plus every name PEFT maps; then each target
    naming an expert projection or the router moves to `target_parameters`, and the gate and
    up projections, fused into one weight, get one adapter of twice the rank and alpha (the
    two adapters side by side). Naming only one of the two is refused, as PEFT refuses it.
    """
    names = MOE_TARGET_NAMES.get(model.config.model_type)
    if names is None or not cfg.targets:
        return cfg
    targets = cfg.targets
    if isinstance(targets, str):
        targets = _resolved_targets(targets, model, names)
        if not targets:
            return cfg  # nothing matched: left to the usual message
    parameters, remaining, fused = list(cfg.target_parameters), [], set()
    for target in targets:
        old = next((o for o in names if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.append(target)
            continue
        if names[old] not in parameters:
            parameters.append(names[old])
        if names[old] == FUSED:
            fused.add(old)
    parts = [o for o, new in names.items() if new == FUSED]
    if fused and len(fused) < len(parts):
        missing = next(p for p in parts if p not in fused)
        raise JaxftError(f"lora target {sorted(fused)[0]!r} is fused with {missing!r} into the "
                         f"experts' {FUSED} of this {model.config.model_type} model: name both "
                         "or neither (PEFT refuses one alone)")
    doubled = len(fused) == len(parts)
    return dataclasses.replace(
        cfg, targets=tuple(remaining), target_parameters=tuple(parameters),
        rank_pattern=cfg.rank_pattern + (((FUSED, 2 * cfg.rank),) if doubled else ()),
        alpha_pattern=cfg.alpha_pattern + (((FUSED, 2 * cfg.alpha),) if doubled else ()))


def _resolved_targets(targets: str, model: nnx.Module, names: dict[str, str]) -> list[str]:
    """PEFT's `_resolve_string_target_modules`: the leaf names a regex (or `all-linear`)
    targets, including the projections transformers 4 had where it now has parameters."""
    if is_all_linear(targets):
        leaves = {p.rsplit(".", 1)[-1] for p, _ in linear_modules(model) if not is_output_head(p)}
        return sorted(leaves | set(names))
    modules = [name for path, _ in linear_modules(model) for name in hf_paths(model, path)]
    modules += [name for path, _ in experts.router_modules(model)
                for name in hf_paths(model, path)]
    containers = [name for path, _ in experts.expert_modules(model)
                  for name in hf_paths(model, path)]
    matched = {m.rsplit(".", 1)[-1] for m in modules if target_matches(targets, m)}
    matched |= {old for old, new in names.items() if new in experts.PARAMETERS
                and any(target_matches(targets, f"{c}.{old}") for c in containers)}
    return sorted(matched)


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, seed: int = 0) -> nnx.Module:
    """Attach adapters to the targeted projections, in place; returns the model.

    Raises if a target matches nothing, so a misspelt or wrong-family target never trains
    silently without adapters. The factors are float32 whatever the base's dtype (PEFT's
    `autocast_adapter_dtype` does the same): they are small, and bfloat16 master weights would
    round away updates of lr-sized steps.
    """
    if cfg.rank <= 0 or any(r <= 0 for _, r in cfg.rank_pattern):
        raise JaxftError(f"lora.rank must be positive, got {cfg.rank}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise JaxftError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    cfg = peft_moe_targets(cfg, model)
    rngs = nnx.Rngs(seed)
    applied = []
    for path, linear in list(linear_modules(model)):
        if not _matches(cfg, model, path) or set(path.split(".")) & set(cfg.modules_to_save):
            continue
        shape = linear.kernel_shape
        stacked = len(shape) == 3
        d_in, d_out = shape[-2:]
        rank = cfg.rank_for(path)
        linear.adapter = LoRA(d_in, d_out, rank, cfg.scale_for(path), cfg.dropout,
                              axes=linear.kernel_axes[-2:],
                              layers=shape[0] if stacked else None, rngs=rngs,
                              param_dtype=jnp.float32, dora=cfg.use_dora)
        if cfg.use_dora:
            linear.adapter.magnitude[...] = weight_norms(linear)
        applied.append(path)
    available = ", ".join(sorted({p.rsplit(".", 1)[-1] for p, _ in linear_modules(model)}))
    routed = ("; its experts are parameters: lora.target_parameters="
              "mlp.experts.gate_up_proj,mlp.experts.down_proj"
              if model.config.routes_tokens else "")
    if not applied and not cfg.target_parameters:
        raise JaxftError(f"lora.targets {_show(cfg.targets)} match no module of this "
                         f"{model.config.model_type} model (its projections: "
                         f"{available}{routed})")
    if isinstance(cfg.targets, (list, tuple)):
        for target in cfg.targets:
            if not any(p == target or p.endswith("." + target) for p in applied):
                raise JaxftError(f"lora target {target!r} matches no module of this "
                                 f"{model.config.model_type} model (its projections: "
                                 f"{available}; or 'all-linear'{routed})")
    _apply_to_experts(model, cfg, rngs)
    return model


def _apply_to_experts(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
    """An `ExpertLoRA` on each expert weight `cfg.target_parameters` names, a `LoRA` on each
    router it names."""
    if not cfg.target_parameters:
        return
    if cfg.dropout or cfg.use_dora:
        raise JaxftError("lora.target_parameters take no lora.dropout and no lora.use_dora "
                         "(PEFT's adapters on parameters have neither)")
    selected, matched, available = select_expert_weights(model, cfg.target_parameters)
    for target in cfg.target_parameters:
        if target not in matched:
            raise JaxftError(
                f"lora target parameter {target!r} matches no expert weight of this "
                f"{model.config.model_type} model"
                + (f" (its expert weights: {', '.join(available)})" if available
                   else " (it has no experts: target_parameters are for mixtures of experts)"))
    modules = {**dict(experts.expert_modules(model)), **dict(experts.router_modules(model))}
    for path, name, short in selected:
        module = modules[path]
        if name == ROUTER_WEIGHT:
            shape, axes = module.kernel.shape, module.kernel.get_metadata()["axes"]
        else:  # a parameter, or a quantized base's packed weight
            shape, axes = module.weight_shape(name), module.weight_axes(name)
        rank, scale = cfg.rank_for(short), cfg.scale_for(short)
        if name == ROUTER_WEIGHT:
            module.adapter = LoRA(shape[-2], shape[-1], rank, scale, 0.0, axes=axes[-2:],
                                  layers=shape[0] if len(shape) == 3 else None, rngs=rngs)
            continue
        module.set_adapter(name, ExpertLoRA(
            shape[-3], shape[-2], shape[-1], rank, scale, axes=axes[-2:],
            layers=shape[0] if len(shape) == 4 else None, rngs=rngs))


ROUTER_WEIGHT = "weight"  # a router's parameter, as PEFT names it (`mlp.gate.weight`)


def parameter_adapters(model: nnx.Module) -> dict[tuple[str, str], tuple[str, nnx.Module]]:
    """{(module path, weight name): (its name as a target gives it, adapter)} for every adapted
    expert weight and router: PEFT's `target_parameters` adapters."""
    adapters = {**expert_adapters(model),
                **{(path, ROUTER_WEIGHT): a for path, a in router_adapters(model).items()}}
    names = [n for n in experts.PARAMETERS] + [ROUTER_WEIGHT]
    selected, _, _ = select_expert_weights(model, names)
    return {(path, name): (short, adapters[path, name]) for path, name, short in selected
            if (path, name) in adapters}


def select_expert_weights(model: nnx.Module, targets: Sequence[str]
                          ) -> tuple[list[tuple[str, str, str]], set[str], list[str]]:
    """PEFT's `target_parameters` rule on a model's expert and router weights: a target
    selects a weight when it equals the weight's Hugging Face path or ends it after a dot.
    Returns the selected (module path, weight name, name as a target gives it:
    `mlp.experts.gate_up_proj`, `mlp.gate.weight`) in the order the model defines them, the
    targets that selected something, and every such weight's name as a target gives it."""
    candidates = [(path, name) for path, _ in experts.expert_modules(model)
                  for name in experts.PARAMETERS]
    candidates += [(path, ROUTER_WEIGHT) for path, _ in experts.router_modules(model)]
    selected, matched, available = [], set(), set()
    for path, name in candidates:
        names = [f"{layer}.{name}" for layer in hf_paths(model, path)]
        short = re.sub(r"^.*?\.\d+\.", "", names[0])
        available.add(short)
        hits = {t for t in targets for n in names if n == t or n.endswith("." + t)}
        if hits:
            selected.append((path, name, short))
            matched |= hits
    return selected, matched, sorted(available)


def _show(targets: Sequence[str] | str) -> str:
    return repr(targets) if isinstance(targets, str) else "[" + ", ".join(targets) + "]"


def trainable_filter(lora: LoraConfig | None) -> nnx.filterlib.Filter:
    """What trains: everything (full fine-tuning) or the adapters plus `modules_to_save`."""
    if lora is None:
        return nnx.Param
    saved = [nnx.PathContains(name) for name in lora.modules_to_save]
    return nnx.Any(nnx.LoRAParam, *[nnx.All(nnx.Param, s) for s in saved])


def count_parameters(state: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(state))


def log_trainable(model: nnx.Module, lora: LoraConfig | None) -> tuple[int, int]:
    """Print and return (trainable, total) parameter counts."""
    from jaxft import quant

    trainable = count_parameters(nnx.state(model, trainable_filter(lora)))
    total = count_parameters(nnx.state(model, nnx.Param)) + quant.packed_size(model)[1]
    message = (f"trainable params: {trainable:,} || all params: {total:,} || "
               f"trainable%: {100 * trainable / total:.4f}")
    logging.info(message)
    print(message)
    return trainable, total


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (W + scale·A·B, DoRA's rescaled to its magnitudes)
    and drop it, in place. A quantized base is dequantized first (every packed kernel, adapter
    or not), so the merged model is the dense weights the run trained against, plus the
    adapters, in the parameter dtype."""
    from jaxft import quant

    quant.dequantize_model(model)
    for _, linear in linear_modules(model):
        adapter = linear.adapter
        if isinstance(adapter, LoRA):
            a = adapter.lora_a[...].astype(jnp.float32)
            b = adapter.lora_b[...].astype(jnp.float32)
            delta = jnp.einsum("...ir,...ro->...io", a, b) * adapter.scale
            merged = linear.kernel[...].astype(jnp.float32) + delta
            if adapter.magnitude is not None:  # DoRA: each output's column rescaled to m
                rescale = adapter.magnitude[...].astype(jnp.float32) / column_norms(merged)
                merged = merged * rescale[..., None, :]
            linear.kernel[...] = merged.astype(linear.kernel.dtype)
            linear.adapter = None
    for (path, name), adapter in expert_adapters(model).items():
        module = dict(experts.expert_modules(model))[path]
        weight = getattr(module, name)
        weight[...] = (weight[...].astype(jnp.float32) + adapter.delta()).astype(weight.dtype)
        module.set_adapter(name, None)
    for path, adapter in router_adapters(model).items():
        router = dict(experts.router_modules(model))[path]
        delta = jnp.einsum("...ir,...ro->...io", adapter.lora_a[...].astype(jnp.float32),
                           adapter.lora_b[...].astype(jnp.float32)) * adapter.scale
        router.kernel[...] = (router.kernel[...].astype(jnp.float32) + delta).astype(
            router.kernel.dtype)
        router.adapter = None
    return model
