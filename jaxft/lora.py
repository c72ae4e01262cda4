"""LoRA as a partition of the parameter pytree.

`apply_lora` attaches a `LoRA` adapter to every targeted `Linear`. Its factors are `nnx.LoRAParam`
variables, so one filter (`trainable_filter`) splits the model state into what trains and what
stays frozen, and the optimizer never sees the frozen base. B starts at zero, so a fresh adapter
leaves every logit bitwise equal to the base model's.

Targets use Hugging Face module names, as PEFT's `target_modules` does: a list of names matches
any module whose dotted path ends with one of them (`q_proj`, `c_attn`, `query`); a single
string is a regular expression matched against full Hugging Face paths
(`model.layers.3.self_attn.q_proj`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import models
from jaxft.errors import JaxftError
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
    modules_to_save: tuple[str, ...] = ()  # non-LoRA modules that train fully (e.g. classifier)

    def rank_for(self, name: str) -> int:
        for key, rank in self.rank_pattern:
            if name == key or name.endswith("." + key):
                return rank
        return self.rank

    def scale(self, rank: int) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (stable at high rank)."""
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank


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
    return models.tensor_table(model).layer_paths(path, model.config.num_hidden_layers)


def has_adapters(model: nnx.Module) -> bool:
    """Whether any projection of `model` carries a LoRA adapter."""
    return any(linear.adapter is not None for _, linear in linear_modules(model))


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
    rngs = nnx.Rngs(seed)
    applied = []
    for path, linear in list(linear_modules(model)):
        if not _matches(cfg, model, path) or set(path.split(".")) & set(cfg.modules_to_save):
            continue
        shape = linear.kernel_shape
        stacked = len(shape) == 3
        d_in, d_out = shape[-2:]
        rank = cfg.rank_for(path)
        linear.adapter = LoRA(d_in, d_out, rank, cfg.scale(rank), cfg.dropout,
                              axes=linear.kernel_axes[-2:],
                              layers=shape[0] if stacked else None, rngs=rngs,
                              param_dtype=jnp.float32, dora=cfg.use_dora)
        if cfg.use_dora:
            linear.adapter.magnitude[...] = weight_norms(linear)
        applied.append(path)
    available = ", ".join(sorted({p.rsplit(".", 1)[-1] for p, _ in linear_modules(model)}))
    if not applied:
        raise JaxftError(f"lora.targets {_show(cfg.targets)} match no module of this "
                         f"{model.config.model_type} model (its projections: {available})")
    if isinstance(cfg.targets, (list, tuple)):
        for target in cfg.targets:
            if not any(p == target or p.endswith("." + target) for p in applied):
                routed = (", and its experts are not projections LoRA reaches"
                          if model.config.routes_tokens else "")
                raise JaxftError(f"lora target {target!r} matches no module of this "
                                 f"{model.config.model_type} model (its projections: "
                                 f"{available}; or 'all-linear'{routed})")
    return model


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
    return model
