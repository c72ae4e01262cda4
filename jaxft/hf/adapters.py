"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

PEFT is how PyTorch users share LoRA fine-tunes, so jaxft writes and reads its format exactly.
Every name comes from the family's Hugging Face tensor table: a projection whose kernel maps to
`<module>.weight` has PEFT factors `base_model.model.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r], which are jaxft's `lora_a` [in, r] and `lora_b` [r, out] transposed,
whatever the kernel's own transform. A kernel the table stores untransposed (GPT-2's `Conv1D`,
[in, out]) is what PEFT calls `fan_in_fan_out`; it changes how PEFT merges, not the factors.

DoRA adapters (`use_dora`) carry one more tensor per projection, PEFT's
`<module>.lora_magnitude_vector` [out] (saved without a `.weight` suffix, as PEFT saves it).

Adapters on a mixture of experts' expert weights are PEFT's `target_parameters`: one
`lora_A` [E·r, in] and `lora_B` [out, r·E] per weight and layer, named by PEFT's nested
wrappers (`_expert_factors`).

Non-LoRA parameters that trained in full (`modules_to_save`) travel as their plain Hugging Face
names under `base_model.model.`, as PEFT saves them. A task head jaxft may initialise itself
(a classifier on an encoder checkpoint) always travels too: PyTorch would draw a different one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxft import dtypes, lora, models, outdir
from jaxft.dtypes import DTypeLike
from jaxft.errors import JaxftError, collected
from jaxft.hf import hub, weights
from jaxft.models import experts, params
from jaxft.models.layers import is_output_head, linear_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# LoRA's factors, and DoRA's magnitudes (saved without PEFT's `.weight` suffix).
_FACTOR = re.compile(r"(.+)\.lora_(?:([AB])\.weight|(magnitude_vector))")
# What `_split_factors` calls each tensor of one projection, and its name in PEFT's file.
TENSOR_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "M": "lora_magnitude_vector"}

# adapter_config.json options that change what the adapter computes and that jaxft does not
# implement: refused by name rather than loaded wrongly. Init-time options (init_lora_weights,
# loftq/eva/corda/lora_ga configs) are irrelevant once the factors exist and are ignored.
UNSUPPORTED = {
    "layer_replication": "layer replication",
    "layers_to_transform": "adapters on some layers only",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "Megatron layers",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
}


@dataclasses.dataclass(frozen=True)
class Site:
    """One projection that can carry an adapter, named both ways."""

    path: str  # jaxft module path, e.g. 'model.layers.self_attn.q_proj' (stacked over layers)
    hf: str  # Hugging Face module name; '{L}' is the layer: 'model.layers.{L}.self_attn.q_proj'
    fan_in_fan_out: bool  # HF stores this weight [in, out] (GPT-2's Conv1D)
    layers: tuple[int, ...]  # the Hugging Face layers its stack holds, in order

    def names(self) -> list[str]:
        """The PEFT module keys, one per layer (one if not stacked)."""
        if "{L}" not in self.hf:
            return [self.hf]
        return [self.hf.replace("{L}", str(i)) for i in self.layers]

    def pattern_tail(self) -> str:
        """The shortest name that picks this projection in every layer (rank_pattern keys)."""
        return self.hf.split("{L}.", 1)[1] if "{L}" in self.hf else self.hf


def sites(model: nnx.Module) -> dict[str, Site]:
    """Every `Linear` of the model as a `Site`, named through the family's tensor table."""
    mapping = models.tensor_table(model.config)
    found = {}
    for path, _ in linear_modules(model):
        entry = mapping.entry(path + ".kernel")
        if entry is None:
            raise JaxftError(f"no Hugging Face name maps to {path}.kernel")
        hf, transform = entry
        found[path] = Site(path, _as_saved(model, hf.removesuffix(".weight")),
                           transform == params.IDENTITY,
                           tuple(mapping.layers_of(path, model.config.num_hidden_layers)))
    return found


def _as_saved(model: nnx.Module, hf_name: str) -> str:
    """A table name as this model's checkpoints spell it: a bare encoder has no `bert.`."""
    prefix = models.tensor_table(model.config).base_prefix
    if prefix and not model.config.has_base_prefix and hf_name.startswith(prefix):
        return hf_name[len(prefix):]
    return hf_name


def task_type(model: nnx.Module) -> str:
    """PEFT's task type, which decides the PeftModel class (and its base model class)."""
    if model.config.num_labels:
        return "SEQ_CLS"
    if models.family_for({"model_type": model.config.model_type}) is models.bert:
        return "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


# ------------------------------------------------------------------------------------------------
# Out: jaxft adapters -> PEFT
# ------------------------------------------------------------------------------------------------


def save_peft_adapter(
    model: nnx.Module,
    lora_cfg: lora.LoraConfig,
    out_dir: str | os.PathLike,
    *,
    base_name: str | None = None,
    dtype: DTypeLike = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the model's adapters as a PEFT LoRA directory.

    It loads with `peft.PeftModel.from_pretrained(<transformers base>, out_dir)`. `base_name`
    becomes `base_model_name_or_path`; `lora_cfg` supplies alpha, dropout, rsLoRA and
    `modules_to_save` (ranks and per-module scales are read from the adapters themselves).
    Only process 0 writes; every process must call it (factors are gathered from all).
    """
    target = dtypes.numpy_type(dtype, "dtype")
    if not lora.has_adapters(model):
        raise JaxftError("the model has no LoRA adapters to save (save_pretrained writes it whole)")
    out = outdir.prepare(out_dir, overwrite=overwrite)
    tensors = {name: np.ascontiguousarray(value.astype(target))
               for name, value in adapter_tensors(model, lora_cfg)}
    config = peft_config(model, lora_cfg, base_name=base_name)
    if jax.process_index() == 0:
        weights.write_safetensors(tensors, out / WEIGHTS_NAME)
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _adapted(model: nnx.Module) -> dict[str, lora.LoRA]:
    return {path: linear.adapter for path, linear in linear_modules(model)
            if isinstance(linear.adapter, lora.LoRA)}


def adapter_tensors(
    model: nnx.Module, lora_cfg: lora.LoraConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, array) for every LoRA factor and every saved module, one at a time."""
    table = sites(model)
    for path, adapter in _adapted(model).items():
        site = table[path]
        a = params.to_host(adapter.lora_a[...])  # [L,] in r
        b = params.to_host(adapter.lora_b[...])  # [L,] r out
        m = None if adapter.magnitude is None else params.to_host(adapter.magnitude[...])
        for i, name in enumerate(site.names()):
            stacked = a.ndim == 3
            layer_a, layer_b = (a[i], b[i]) if stacked else (a, b)
            yield f"{PREFIX}{name}.lora_A.weight", layer_a.T  # r in
            yield f"{PREFIX}{name}.lora_B.weight", layer_b.T  # out r
            if m is not None:
                yield f"{PREFIX}{name}.{TENSOR_SUFFIXES['M']}", m[i] if stacked else m  # out
    yield from _expert_factors(model)
    saved, _ = _saved_modules(model, lora_cfg)
    for name, value in params.export_tensors(
        saved, models.tensor_table(model.config), num_layers=model.config.num_hidden_layers,
        with_base_prefix=model.config.has_base_prefix,
    ):
        yield PREFIX + name, value


def _expert_factors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """PEFT's tensors for the adapters on expert weights (`target_parameters`).

    PEFT wraps each targeted weight of a module in its own `ParamWrapper`, nested in the order
    the module defines its weights (the first innermost), so with both of an `experts` module's
    weights adapted `gate_up_proj`'s factors are `experts.base_layer.lora_A` and `down_proj`'s
    `experts.lora_A`. Its `lora_A` [E·r, in] stacks the experts' A_e [r, in] expert by expert;
    its `lora_B` [out, r·E] interleaves them, column j·E + e being column j of B_e."""
    adapters = lora.expert_adapters(model)
    for path in dict.fromkeys(p for p, _ in adapters):
        names = [n for n in experts.PARAMETERS if (path, n) in adapters]
        for name, wrapper in _nested_wrappers(names):
            a = params.to_host(adapters[path, name].lora_a[...])  # [L,] E in r
            b = params.to_host(adapters[path, name].lora_b[...])  # [L,] E r out
            stacked = a.ndim == 4
            for i, module in enumerate(lora.hf_paths(model, path)):
                layer_a, layer_b = (a[i], b[i]) if stacked else (a, b)
                e, d_in, r = layer_a.shape
                yield (f"{PREFIX}{module}.{wrapper}lora_A.weight",
                       layer_a.transpose(0, 2, 1).reshape(e * r, d_in))
                yield (f"{PREFIX}{module}.{wrapper}lora_B.weight",
                       layer_b.transpose(2, 1, 0).reshape(layer_b.shape[-1], r * e))
    for path, adapter in lora.router_adapters(model).items():  # plain LoRA on [E, D]
        a = params.to_host(adapter.lora_a[...])  # [L,] D r
        b = params.to_host(adapter.lora_b[...])  # [L,] r E
        for i, module in enumerate(lora.hf_paths(model, path)):
            layer_a, layer_b = (a[i], b[i]) if a.ndim == 3 else (a, b)
            yield f"{PREFIX}{module}.lora_A.weight", layer_a.T
            yield f"{PREFIX}{module}.lora_B.weight", layer_b.T


def _nested_wrappers(names: list[str]) -> list[tuple[str, str]]:
    """(weight, where PEFT's factors for it sit below the module) for the adapted weights of
    one module, in the order it defines them: each later wrapper wraps the earlier ones, so the
    first is deepest (`base_layer.base_layer.…`) and the last is the module's own."""
    return [(name, "base_layer." * (len(names) - 1 - depth)) for depth, name in enumerate(names)]


def _saved_modules(model: nnx.Module, lora_cfg: lora.LoraConfig) -> tuple[nnx.State, list[str]]:
    """The parameters PEFT must carry beside the factors, and their `modules_to_save` names.

    Those are what trained in full (`lora_cfg.modules_to_save`), and any task head the model
    may have initialised itself (unless an adapter sits on it: PEFT cannot have both).
    """
    adapted = _adapted(model)
    names = list(lora_cfg.modules_to_save)
    fresh = []
    mapping = models.tensor_table(model.config)

    def keep(path_tuple, var) -> bool:
        path = ".".join(str(p) for p in path_tuple)
        if isinstance(var, nnx.LoRAParam) or not isinstance(var, nnx.Param):
            return False
        if set(path_tuple) & set(lora_cfg.modules_to_save):
            return True
        if model.config.may_be_missing(path) and path.rsplit(".", 1)[0] not in adapted:
            module = _as_saved(model, _hf_param_name(mapping, path).rsplit(".", 1)[0])
            if module not in fresh:
                fresh.append(module)
            return True
        return False

    state = nnx.state(model, keep)
    covered = [m for m in fresh if not any(n in m.split(".") for n in names)]
    return state, names + covered


def _hf_param_name(mapping: params.TensorMapping, path: str) -> str:
    entry = mapping.entry(path)
    if entry is None:
        raise JaxftError(f"no Hugging Face name maps to {path}")
    return entry[0]


def peft_config(
    model: nnx.Module, lora_cfg: lora.LoraConfig, *, base_name: str | None = None
) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for the model's adapters: the fields PEFT reads."""
    table = sites(model)
    adapted = _adapted(model)
    ranks = {p: int(a.lora_a.shape[-1]) for p, a in adapted.items()}
    alphas = {p: round(float(a.scale) * (math.sqrt(ranks[p]) if lora_cfg.use_rslora
                                           else ranks[p]), 6) for p, a in adapted.items()}
    _, saved_names = _saved_modules(model, lora_cfg)
    parameter_ranks, parameter_alphas = _parameter_patterns(model, lora_cfg)
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_name,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.use_rslora,
        "target_modules": _target_modules(table, adapted, saved_names) if adapted else [],
        "target_parameters": _target_parameters(model) or None,
        "rank_pattern": {**_patterns(table, ranks, lora_cfg.rank), **parameter_ranks},
        "alpha_pattern": {**_patterns(table, alphas, lora_cfg.alpha), **parameter_alphas},
        "modules_to_save": saved_names or None,
        "fan_in_fan_out": bool(adapted) and all(table[p].fan_in_fan_out for p in adapted),
        "bias": "none",
        "lora_bias": False,
        "use_dora": any(a.magnitude is not None for a in adapted.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "exclude_modules": None,
        "revision": None,
    }


def _target_modules(table: dict[str, Site], adapted: dict, saved: list[str]) -> list[str] | str:
    """Short module names when they select exactly the adapted projections, else a regex."""
    names = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    selected = {p for p, site in table.items()
                if p.rsplit(".", 1)[-1] in names and not any(_is_saved(k, saved)
                                                               for k in site.names())}
    if selected == set(adapted):
        return names
    return "|".join(re.escape(table[p].hf).replace(re.escape("{L}"), r"\d+") for p in adapted)


def _target_parameters(model: nnx.Module) -> list[str]:
    """PEFT's names of the adapted expert weights and routers, as they end each layer's
    parameter path (`mlp.experts.gate_up_proj`, `mlp.gate.weight`)."""
    return sorted({short for short, _ in lora.parameter_adapters(model).values()})


def _parameter_patterns(model: nnx.Module, lora_cfg: lora.LoraConfig) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern entries for the expert and router adapters whose rank or
    alpha is not the config's (PEFT's fused gate_up_proj: twice both)."""
    ranks, alphas = {}, {}
    for short, adapter in lora.parameter_adapters(model).values():
        rank = int(adapter.lora_a.shape[-1])
        alpha = round(float(adapter.scale) * (math.sqrt(rank) if lora_cfg.use_rslora
                                              else rank), 6)
        if rank != lora_cfg.rank:
            ranks[short] = rank
        if not math.isclose(alpha, lora_cfg.alpha, rel_tol=1e-6):
            alphas[short] = alpha
    return ranks, alphas


def _patterns(table: dict[str, Site], values: dict[str, float], default: float) -> dict:
    """PEFT's rank_pattern / alpha_pattern: entries only where a module differs from default."""
    by_name: dict[str, set] = {}
    for path, value in values.items():
        by_name.setdefault(path.rsplit(".", 1)[-1], set()).add(value)
    pattern = {}
    for path, value in values.items():
        if math.isclose(value, default, rel_tol=1e-6):
            continue
        short = path.rsplit(".", 1)[-1]
        key = short if len(by_name[short]) == 1 else table[path].pattern_tail()
        pattern[key] = int(value) if float(value).is_integer() else value
    return pattern


# ------------------------------------------------------------------------------------------------
# In: PEFT -> jaxft adapters
# ------------------------------------------------------------------------------------------------


def load_peft_adapter(model: nnx.Module, adapter_dir: str | os.PathLike) -> lora.LoraConfig:
    """Attach a PEFT LoRA adapter (directory or hub id) to the model, in place.

    Returns the `LoraConfig` that reproduces it, for `lora.trainable_filter` if training goes
    on. Everything is checked before the model changes: options jaxft does not implement,
    targets or shapes that do not fit this model, missing or unexpected tensors.
    """
    directory = hub.resolve(adapter_dir)
    source = str(directory)
    config = read_adapter_config(directory)
    if lora.has_adapters(model):
        raise JaxftError(f"{source}: the model already has LoRA adapters")
    if config.get("task_type") == "SEQ_CLS" and task_type(model) != "SEQ_CLS":
        raise JaxftError(f"{source}: a sequence-classification adapter needs a classifier "
                         "base (load it with num_labels=<the adapter's number of classes>)")
    table = sites(model)
    plan = _plan(model, table, config, source) if config.get("target_modules") else {}
    tensors = _read_weights(directory)
    expert_factors, parameters = _expert_factors_in(model, config, tensors, source)
    dora = bool(config.get("use_dora", False))
    factors, others = _split_factors(model, table, plan, tensors, source, dora=dora)

    paths = set(table) | _param_paths(model)
    saved = tuple(n for n in config.get("modules_to_save") or ()
                  if "." not in n and any(n in p.split(".") for p in paths))
    rank = int(config.get("r", 8))
    cfg = lora.LoraConfig(
        rank=rank, alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(plan),
        use_rslora=bool(config.get("use_rslora", False)), use_dora=dora,
        rank_pattern=tuple((p, r) for p, (r, _) in plan.items() if r != rank) + tuple(
            (short, a.shape[-1]) for short, a, _, _ in expert_factors.values()
            if a.shape[-1] != rank),
        modules_to_save=saved, target_parameters=parameters)
    state = _saved_state(model, others, source)
    lora.apply_lora(model, cfg)
    adapted = lora.parameter_adapters(model)
    for key, (_, a, b, scale) in expert_factors.items():
        adapter = adapted[key][1]
        adapter.scale = scale
        adapter.lora_a[...] = a.astype(adapter.lora_a.dtype)
        adapter.lora_b[...] = b.astype(adapter.lora_b.dtype)
    linears = dict(linear_modules(model))
    for path, (_, scale) in plan.items():
        adapter = linears[path].adapter
        adapter.scale = scale
        adapter.lora_a[...] = factors[path, "A"].astype(adapter.lora_a.dtype)
        adapter.lora_b[...] = factors[path, "B"].astype(adapter.lora_b.dtype)
        if dora:
            adapter.magnitude[...] = factors[path, "M"].astype(adapter.magnitude.dtype)
    if state is not None:
        nnx.update(model, state)
    return cfg


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """`adapter_config.json`, refused with the option's name if jaxft cannot reproduce it."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise JaxftError(f"{directory}: no {CONFIG_NAME} (expected a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise JaxftError(f"{file}: not valid JSON ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise JaxftError(f"{file}: peft_type {config['peft_type']!r} is not supported (LORA only)")
    for option, what in UNSUPPORTED.items():
        if config.get(option):
            raise JaxftError(f"{file}: {option}={config[option]!r} ({what}) is not supported")
    if config.get("bias", "none") != "none":
        raise JaxftError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    if not config.get("target_modules") and not config.get("target_parameters"):
        raise JaxftError(f"{file}: target_modules is not set")
    return config


def _plan(model: nnx.Module, table: dict[str, Site], config: dict, source: str) -> dict:
    """{jaxft path: (rank, scale)} for the projections the adapter targets, by PEFT's rules."""
    targets = config["target_modules"]
    saved = config.get("modules_to_save") or []
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    plan = {}
    for path, site in table.items():
        hits = [_is_target(key, config, site, model) and not _is_saved(key, saved)
                for key in site.names()]
        if not any(hits):
            continue
        if not all(hits):
            layers = [site.layers[i] for i, hit in enumerate(hits) if hit]
            raise JaxftError(f"{source}: target_modules select only layers {layers} of "
                             f"{site.hf}; jaxft adapts all layers of a projection or none")
        per_layer = {(_pattern_value(config.get("rank_pattern") or {}, k, rank),
                      _pattern_value(config.get("alpha_pattern") or {}, k, alpha))
                     for k in site.names()}
        if len(per_layer) > 1:
            raise JaxftError(f"{source}: rank_pattern/alpha_pattern give the layers of "
                             f"{site.hf} different ranks or alphas; jaxft needs one per projection")
        (r, a), = per_layer
        scale = lora.LoraConfig(alpha=a, use_rslora=bool(config.get("use_rslora"))).scale(int(r))
        plan[path] = (int(r), scale)
    if not plan:
        names = sorted({s.hf.rsplit(".", 1)[-1] for s in table.values()})
        raise JaxftError(f"{source}: target_modules {targets!r} match no projection of this "
                         f"{model.config.model_type} model (its projections: {', '.join(names)})")
    return plan


def _is_target(key: str, config: dict, site: Site, model: nnx.Module) -> bool:
    """PEFT's `check_target_module_exists`, for one module key."""
    targets, exclude = config["target_modules"], config.get("exclude_modules")
    if exclude and lora.target_matches(exclude, key):
        return False
    if lora.is_all_linear(targets):
        return not is_output_head(site.path)
    return lora.target_matches(targets, key)


def _is_saved(key: str, saved: list[str]) -> bool:
    """PEFT never puts an adapter inside a module it saves whole."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved)


def _pattern_value(pattern: dict, key: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first pattern that matches the key's dotted tail."""
    for p, value in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def _expert_factors_in(model: nnx.Module, config: dict, tensors: dict[str, np.ndarray],
                       source: str) -> tuple[dict, tuple[str, ...]]:
    """The factors of PEFT's adapters on expert weights and routers (`target_parameters`),
    taken out of `tensors` and laid out as jaxft's: {(module path, weight): (name as a target
    gives it, A [L, E, in, r] (a router's: [L, in, r]), B [L, E, r, out] ([L, r, out]),
    scale)}, and the targets that matched; the inverse of `_expert_factors`."""
    targets = tuple(config.get("target_parameters") or ())
    if not targets:
        return {}, ()
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    selected, matched, _ = lora.select_expert_weights(model, targets)
    modules = {**dict(experts.expert_modules(model)), **dict(experts.router_modules(model))}
    found, problems = {}, []
    for path in dict.fromkeys(p for p, _, _ in selected):
        module, layers = modules[path], lora.hf_paths(model, path)
        names = [(n, short) for p, n, short in selected if p == path]
        wrappers = dict(_nested_wrappers([n for n, _ in names]))
        for name, short in names:
            router = name == lora.ROUTER_WEIGHT
            count, d_in, d_out = ((1, *module.kernel.shape[-2:]) if router
                                  else getattr(module, name).shape[-3:])
            key = f"{layers[0]}.{name}"
            r = int(_pattern_value(config.get("rank_pattern") or {}, key, rank))
            a_r = float(_pattern_value(config.get("alpha_pattern") or {}, key, alpha))
            per_layer = []
            for hf_module in layers:
                keys = [f"{PREFIX}{hf_module}.{'' if router else wrappers[name]}lora_{x}.weight"
                        for x in "AB"]
                missing = [k for k in keys if k not in tensors]
                if missing:
                    problems.append(f"missing tensor {missing[0]}")
                    continue
                a, b = (tensors.pop(k) for k in keys)
                want = {"A": (count * r, d_in), "B": (d_out, r * count)}
                if a.shape != want["A"] or b.shape != want["B"]:
                    what = "the router" if router else f"{count} experts"
                    problems.append(
                        f"{keys[0]} and lora_B have shapes {tuple(a.shape)}, {tuple(b.shape)} "
                        f"but {what} of {hf_module}.{name} ({d_in} in, {d_out} out, r={r}) "
                        f"need {want['A']}, {want['B']}")
                    continue
                per_layer.append((a.T, b.T) if router else
                                 (a.reshape(count, r, d_in).transpose(0, 2, 1),
                                  b.reshape(d_out, r, count).transpose(2, 1, 0)))
            if len(per_layer) == len(layers):
                scale = lora.LoraConfig(alpha=a_r, use_rslora=bool(config.get("use_rslora"))
                                        ).scale(r)
                factors = (np.stack(f) for f in zip(*per_layer, strict=True))
                found[path, name] = (short, *factors, scale)
    for target in targets:
        if target not in matched:
            problems.append(f"target_parameters entry {target!r} matches no expert weight of "
                            f"this {model.config.model_type} model")
    if problems:
        raise collected(source, problems)
    return found, tuple(t for t in targets if t in matched)


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    file = directory / WEIGHTS_NAME
    if not file.is_file():
        found = "adapter_model.bin (convert it to safetensors)" if (
            directory / "adapter_model.bin").is_file() else "nothing"
        raise JaxftError(f"{directory}: no {WEIGHTS_NAME} (found {found})")
    return load_file(str(file))


def _split_factors(model, table: dict[str, Site], plan: dict, tensors: dict, source: str, *,
                   dora: bool = False):
    """Stacked jaxft factors {(path, 'A'|'B'|'M'): array} (M: DoRA's magnitudes) and the
    remaining (saved-module) tensors.

    Every problem (a module the base lacks, a wrong shape, a missing layer) is collected and
    raised once.
    """
    mapping = models.tensor_table(model.config)
    linears = dict(linear_modules(model))
    layers: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    others, problems = {}, []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            problems.append(f"tensor {key} does not start with {PREFIX}")
            continue
        name = key[len(PREFIX):]
        factor = _FACTOR.fullmatch(name)
        if factor is None:
            if ".lora_" in name:
                problems.append(f"tensor {key} is not a LoRA factor jaxft supports")
            else:
                others[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = value
            continue
        module, which = factor.group(1), factor.group(2) or "M"
        if which == "M" and not dora:
            problems.append(f"tensor {key} is a DoRA magnitude, but the adapter's config has "
                            "no use_dora")
            continue
        hit = mapping.match(mapping.normalize(module + ".weight"))
        path = hit[0].removesuffix(".kernel") if hit else None
        if path not in table:
            problems.append(f"tensor {key}: this {model.config.model_type} model has no "
                            f"projection {module}")
            continue
        if path not in plan:
            problems.append(f"tensor {key}: target_modules do not select {module}")
            continue
        rank = plan[path][0]
        d_in, d_out = linears[path].kernel_shape[-2:]
        expected = {"A": (rank, d_in), "B": (d_out, rank), "M": (d_out,)}[which]
        if tuple(value.shape) != expected:
            problems.append(f"{module}.{TENSOR_SUFFIXES[which]} has shape {tuple(value.shape)} "
                            f"but {module} ({d_in} in, {d_out} out, r={rank}) needs {expected}")
            continue
        layers.setdefault((path, which), {})[0 if hit[1] is None else hit[1]] = value.T
    factors = {}
    for path in plan:
        for which in "ABM" if dora else "AB":
            got = layers.get((path, which), {})
            missing = [n for i, n in enumerate(table[path].names()) if i not in got]
            if missing:
                problems.append(f"missing tensor {PREFIX}{missing[0]}.{TENSOR_SUFFIXES[which]}")
            elif "{L}" in table[path].hf:
                factors[path, which] = np.stack([got[i] for i in range(len(got))])
            else:
                factors[path, which] = got[0]
    if problems:
        raise collected(source, problems)
    return factors, others


def _param_paths(model: nnx.Module) -> set[str]:
    return set(params.flat_variables(nnx.state(model, nnx.Param)))


def _saved_state(model: nnx.Module, tensors: dict[str, np.ndarray], source: str):
    """The saved modules' parameters as a state to `nnx.update` with, via the tensor table."""
    if not tensors:
        return None
    mapping = models.tensor_table(model.config)
    have = _param_paths(model)
    wanted = set()
    for name in tensors:
        hit = mapping.match(mapping.normalize(name))
        if hit is None or hit[0] not in have:
            raise JaxftError(f"{source}: tensor {PREFIX}{name} matches no parameter of this "
                             f"{model.config.model_type} model")
        wanted.add(hit[0])
    abstract = nnx.state(model, lambda path, var: ".".join(map(str, path)) in wanted
                         and isinstance(var, nnx.Param))
    state, _ = params.load_state(
        abstract, mapping, tensors.items(), source=source,
        tied=model.config.tie_word_embeddings,
        num_layers=model.config.num_hidden_layers)
    return state
