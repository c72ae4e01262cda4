r"""The dry run: what a training run will need per device, before a single weight is read.

  python -m jaxft.train --config=configs/lora.py --dry_run
  python -m jaxft.train --config=configs/lora.py --config.mesh.fsdp=8 --dry_run \
      --config.model.path=meta-llama/Llama-3.1-8B     # fetches config.json only

"Does it fit?" should cost seconds, not a download and an out-of-memory crash. The model is
built with `nnx.eval_shape` from its config alone (a directory holding just `config.json`, a
.gguf file's metadata, or a hub id's `config.json`), LoRA is attached to that abstract model,
and the train step `jaxft.train` runs (`train_step.build`: the same split, shardings, donation
and micro-batching) is lowered and compiled for the configured mesh, on `jax.ShapeDtypeStruct`
inputs that carry their shardings. Nothing is allocated: XLA's `memory_analysis()` says what
each device will hold (arguments: parameters and optimizer state; outputs; temporaries:
activations), and the parameter and optimizer-state bytes are also counted exactly from the
abstract trees. Batch shapes come from `train.batch_size` × `data.max_len`, so neither
tokenizer nor data is read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxft import config as config_lib
from jaxft import dtypes, hf_io, hub, lora, sharding, train_step
from jaxft.dtypes import DTypeLike


@dataclasses.dataclass(frozen=True)
class Bytes:
    """Bytes of a set of arrays: all copies' worth of data once (`total`), and what one device
    holds of it (`per_device`, the largest over devices)."""

    total: int
    per_device: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `describe` prints; every byte count is exact for the abstract trees it came from."""

    model_type: str
    source: str  # the config the model was built from
    mesh: dict[str, int]
    platform: str
    batch_size: int  # global rows per step
    seq_len: int
    accum_steps: int
    remat: str
    param_dtype: str
    compute_dtype: str
    lora_rank: int | None  # None: full fine-tuning
    total_params: int  # every parameter, adapters included (as PEFT counts "all params")
    adapter_params: int  # LoRA factors
    trainable_params: int
    trainable: Bytes
    frozen: Bytes  # frozen parameters (and LoRA dropout keys)
    opt_state: Bytes
    batch: Bytes  # the batch, plus the step's running sums and step number
    memory: dict[str, int]  # XLA's per-device memory_analysis: argument, output, alias, temp, code
    # XLA's cost_analysis of one device's program. XLA counts a loop body once, and the layers
    # run in a `lax.scan`, so this is about one layer's worth: a lower bound.
    xla_flops: float | None
    analytic_flops: float  # the whole step, all devices

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not written in place of a donated argument + temporaries."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]


def make_plan(cfg: ml_collections.ConfigDict) -> Plan:
    """Compile the configured train step abstractly and measure it; reads no weights."""
    config_lib.validate(cfg, jax.device_count())
    compute_dtype = config_lib.compute_dtype(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    lora_cfg = config_lib.lora_config(cfg)
    source, hf_config = hub.resolve_config(cfg.model.path)
    num_labels = (cfg.model.num_labels or 2) if cfg.task == "classification" else None
    abstract = abstract_model(hf_config, source, param_dtype=cfg.train.param_dtype,
                              compute_dtype=compute_dtype, num_labels=num_labels,
                              remat=cfg.train.remat, attention=cfg.model.attention,
                              lora_cfg=lora_cfg, seed=cfg.train.seed)

    # The step jaxft.train runs (train_step.build), on abstract arrays that carry shardings.
    step, states = train_step.build(abstract, cfg, mesh, lora_cfg)
    placed = step.place(states)
    batch = abstract_batch(cfg.task, cfg.train.batch_size, cfg.data.max_len, mesh)
    scalars = jax.tree.map(  # the step's running sums and its number: a few replicated scalars
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step.replicated),
        (train_step.zero_window(cfg.task), train_step.step_number(0)))
    window, number = scalars
    compiled = step.train.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                                placed["opt_state"], window, batch, number).compile()

    tokens = cfg.train.batch_size * cfg.data.max_len
    return Plan(
        model_type=abstract.config.model_type, source=source, mesh=dict(mesh.shape),
        platform=jax.default_backend(), batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_len, accum_steps=cfg.train.accum_steps, remat=cfg.train.remat,
        param_dtype=cfg.train.param_dtype, compute_dtype=compute_dtype,
        lora_rank=None if lora_cfg is None else lora_cfg.rank,
        total_params=lora.count_parameters(nnx.state(abstract, nnx.Param)),
        adapter_params=lora.count_parameters(nnx.state(abstract, nnx.LoRAParam)),
        trainable_params=lora.count_parameters(placed["trainable"]),
        trainable=array_bytes(placed["trainable"]),
        frozen=array_bytes((placed["frozen"], placed["dropout"])),
        opt_state=array_bytes(placed["opt_state"]), batch=array_bytes((batch, scalars)),
        memory=_memory(compiled), xla_flops=_flops(compiled),
        analytic_flops=analytic_flops(abstract, tokens, cfg.data.max_len,
                                      full=lora_cfg is None),
    )


# ---------------------------------------------------------------------------------------------
# The abstract model and inputs
# ---------------------------------------------------------------------------------------------


def abstract_model(hf_config: dict, source: str, *, param_dtype: DTypeLike, compute_dtype: str,
                   num_labels: int | None, remat: str, attention: str,
                   lora_cfg: lora.LoraConfig | None, seed: int = 0) -> nnx.Module:
    """The model `hf_io.load_model` would build (plus LoRA), as shapes only."""
    family, model_cfg = hf_io.model_config(hf_config, source, num_labels=num_labels,
                                           compute_dtype=compute_dtype, remat=remat,
                                           attention=attention)

    def build() -> nnx.Module:
        model = family.Model(model_cfg, rngs=nnx.Rngs(seed),
                             param_dtype=dtypes.jax_dtype(param_dtype))
        if lora_cfg is not None:
            lora.apply_lora(model, lora_cfg, seed=seed)
        return model

    return nnx.eval_shape(build)


def abstract_batch(task: str, batch_size: int, seq_len: int, mesh) -> dict[str, Any]:
    """The batch `jaxft.data` would produce (see `jaxft.data.packing`), as sharded shapes."""
    rows = sharding.batch_sharding(mesh)
    per_row = sharding.batch_sharding(mesh, ndim=1)

    def array(dtype, shape=(batch_size, seq_len)) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows if len(shape) == 2 else per_row)

    if task == "classification":
        return {"input_ids": array(np.int32), "attention_mask": array(np.int32),
                "token_type_ids": array(np.int32), "labels": array(np.int32, (batch_size,)),
                "valid": array(np.float32, (batch_size,))}
    return {"input_ids": array(np.int32), "targets": array(np.int32),
            "loss_mask": array(np.float32), "segment_ids": array(np.int32),
            "positions": array(np.int32), "attention_mask": array(np.int32)}


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def array_bytes(tree: Any) -> Bytes:
    """Total and per-device bytes of every array (abstract or real) in a tree."""
    total, per_device = 0, {}
    for x in jax.tree.leaves(tree):
        itemsize = np.dtype(x.dtype).itemsize
        total += math.prod(x.shape) * itemsize
        for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
            shard = math.prod(len(range(*s.indices(n)))
                              for s, n in zip(index, x.shape, strict=True))
            per_device[device] = per_device.get(device, 0) + shard * itemsize
    return Bytes(total, max(per_device.values(), default=0))


def analytic_flops(model: nnx.Module, tokens: int, seq_len: int, *, full: bool) -> float:
    """FLOPs of one step on all devices: the 6N·tokens rule, counted from the matmuls.

    A forward pass costs 2 FLOPs per weight per token; the backward pass costs 2 more for the
    activation gradients and, only for weights that train, 2 more for the weight gradients:
    6N·tokens in full fine-tuning, 4N·tokens when the base is frozen (LoRA), plus 6 per adapter
    weight. N counts the projection kernels (and a tied embedding, which is the output head);
    embedding lookups cost nothing. Attention scores and values add 4·T·width per token and
    layer forward, 3× that for a training step. Remat recomputation is not included.
    """
    cfg = model.config
    matmul = sum(math.prod(linear.kernel.shape) for _, linear in lora.linear_modules(model))
    if cfg.tie_word_embeddings:
        matmul += cfg.vocab_size * cfg.hidden_size
    adapters = lora.count_parameters(nnx.state(model, nnx.LoRAParam))
    width = cfg.head_dim * cfg.num_attention_heads
    attention = 3 * 4 * seq_len * width * cfg.num_hidden_layers
    return float(tokens * ((6 if full else 4) * matmul + 6 * adapters + attention))


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:  # some backends do not report it
        return dict.fromkeys(("argument", "output", "alias", "temp", "generated_code"), 0)
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "generated_code": m.generated_code_size_in_bytes}


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def describe(plan: Plan) -> str:
    """The dry run's report: one screen, per-device bytes first (that is what must fit)."""
    mesh = " × ".join(f"{k} {v}" for k, v in plan.mesh.items())
    mode = "full fine-tuning" if plan.lora_rank is None else f"LoRA rank {plan.lora_rank}"
    share = 100 * plan.trainable_params / max(plan.total_params, 1)
    adam = plan.opt_state.total - 2 * plan.trainable.total
    m = plan.memory
    rows = [
        ("trainable parameters", plan.trainable),
        ("frozen parameters", plan.frozen),
        ("optimizer state", plan.opt_state),
        ("batch", plan.batch),
    ]
    lines = [
        f"dry run: {plan.model_type} from {plan.source} (no weights read, nothing allocated)",
        f"  {mode}; params {plan.param_dtype}, compute {plan.compute_dtype}; remat "
        f"{plan.remat}; mesh {mesh} ({plan.devices} {plan.platform} devices)",
        f"  step: {plan.batch_size} rows × {plan.seq_len} tokens = "
        f"{plan.batch_size * plan.seq_len:,} tokens, {plan.accum_steps} micro-batch(es)",
        f"parameters: {plan.trainable_params:,} trainable of {plan.total_params:,} "
        f"({share:.4g}%); base model {plan.total_params - plan.adapter_params:,}",
        f"{'analytic bytes':<24}{'all devices':>14}{'per device':>14}",
        *(f"  {name:<22}{_size(b.total):>14}{_size(b.per_device):>14}" for name, b in rows),
        f"  (optimizer state = 2 × trainable for AdamW's m and v, + {adam} B of step counters)",
        "XLA memory per device (compiled.memory_analysis):",
        f"  arguments {_size(m['argument'])} (parameters, optimizer state, batch), outputs "
        f"{_size(m['output'])} ({_size(m['alias'])} of them in donated buffers)",
        f"  temporaries {_size(m['temp'])} (activations, gradients), generated code "
        f"{_size(m['generated_code'])}",
        f"  peak ≈ {_size(plan.peak_bytes)} per device",
        *(["  note: XLA:CPU computes half-precision matmuls on float32 copies of the weights, so "
            "these temporaries overstate an accelerator's; plan on the machine that will train"]
          if plan.platform == "cpu" and plan.compute_dtype != "float32" else []),
        "FLOPs per step:",
        f"  analytic {plan.analytic_flops:.3e} ({'6' if plan.lora_rank is None else '4'}"
        f"N·tokens + attention), {plan.analytic_flops / plan.devices:.3e} per device",
        f"  XLA cost_analysis {plan.xla_flops:.3e} per device (counts the scanned layers "
        "once: a lower bound)" if plan.xla_flops
        else "  XLA cost_analysis: not reported by this backend",
    ]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_plan(cfg: ml_collections.ConfigDict) -> Plan:
    """`--dry_run`: plan, print, return the plan."""
    plan = make_plan(cfg)
    print(describe(plan))
    return plan

