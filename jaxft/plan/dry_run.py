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

With a target (`--topology`: a TPU slice such as `v5e-8`, `jaxft.plan.tpu`, or NVIDIA GPUs
such as `h100x8` or `rtx4060-laptop`, `jaxft.plan.gpu`) the step is compiled by that
accelerator's own XLA compiler for its compile-only devices, on any host: the memory figures are
XLA:TPU's or XLA:GPU's, and the hardware choices (attention kernel, compute dtype, cross-entropy
chunk) are the target's. XLA:TPU refuses a program that does not fit, and that refusal is the
result ("does not fit", with its figure); XLA:GPU compiles it anyway, and the verdict compares
its figure with what JAX lets a program use of the card. The FLOPs of the step, remat's
recomputation included, over the devices' peak bf16 rate bound its time from below.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxft import lora, progress, quant, sharding, spec, tasks, train_step
from jaxft.data.packing import batch_spec
from jaxft.errors import JaxftError
from jaxft.hf import hub
from jaxft.hf.model import blueprint
from jaxft.plan import flops, host, tpu
from jaxft.plan.targets import Target, target


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
    # A mixture of experts: the parameters one token meets (every weight but the experts it is
    # not routed to); None for a dense model
    active_params: int | None
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
    recompute_flops: float  # what remat recomputes in the backward pass, all devices
    target: str | None = None  # the compile target (`describe()`); None: this machine
    capacity: int | None = None  # memory one device lets a program use (targets)
    peak_tflops: float | None = None  # per device, bf16 (targets)
    refusal: str | None = None  # XLA's out-of-memory message when it would not compile
    compiler: str = "XLA"  # "XLA:TPU", "XLA:GPU" for a target
    device_word: str = "device"  # what one device is called: "chip", "GPU"
    memory_word: str = "memory"  # "HBM" on a TPU
    capacity_note: str = ""  # how the capacity was arrived at
    warnings: tuple[str, ...] = ()  # what the compiler said about memory (XLA:GPU)
    base_quant: str = "none"  # how the frozen projections are stored (jaxft.quant)
    packed_params: int = 0  # parameters of the quantized projections
    packed_bytes: int = 0  # what they cost, codes and scales
    # DPO's (or GRPO's, with beta > 0) frozen copy of the initial weights in full fine-tuning:
    # held beside the step's arguments, and scoring each batch in its own, smaller forward pass
    reference: Bytes | None = None
    reference_of: str = "DPO"  # the task that keeps it: DPO or GRPO (with beta > 0)
    # GRPO's rollout: the sampler compiled as the run jits it (prefill + decode on the step's
    # weights): its memory_analysis, the KV cache it holds, its rows and widths
    rollout_memory: dict[str, int] | None = None
    rollout_cache: int = 0
    rollout_shape: tuple[int, int, int] | None = None  # rows, prompt width, completion length

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def argument_bytes(self) -> int:
        """What one device holds before the step runs, counted from the abstract trees."""
        return (self.trainable.per_device + self.frozen.per_device + self.opt_state.per_device
                + self.batch.per_device + self.reference_bytes)

    @property
    def reference_bytes(self) -> int:
        """One device's share of the frozen reference copy (DPO, GRPO) (0: none)."""
        return 0 if self.reference is None else self.reference.per_device

    @property
    def step_peak_bytes(self) -> int:
        """Arguments + outputs not written in place of a donated argument + temporaries; when
        XLA refused, at least the temporaries its message names plus the arguments."""
        if self.refusal is not None:
            needed, whole = tpu.required_bytes(self.refusal) or (0, False)
            return needed if whole else needed + self.argument_bytes
        m = self.memory
        return (m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
                + self.reference_bytes)

    @property
    def rollout_peak_bytes(self) -> int:
        """GRPO's sampler: its own peak (weights, KV cache, logits) plus the optimizer state,
        which stays on the device while it samples (0: no rollout)."""
        if self.rollout_memory is None:
            return 0
        m = self.rollout_memory
        return (m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
                + self.opt_state.per_device)

    @property
    def peak_bytes(self) -> int:
        """The larger of the train step's peak and (GRPO) the rollout's."""
        return max(self.step_peak_bytes, self.rollout_peak_bytes)

    @property
    def fits(self) -> bool | None:
        """Whether the step fits one device's memory (None: no capacity known, this host)."""
        if self.refusal is not None:
            return False
        return None if self.capacity is None else self.peak_bytes <= self.capacity

    @property
    def step_seconds(self) -> float | None:
        """A lower bound on the step's time: its FLOPs at the devices' peak rate."""
        if self.peak_tflops is None:
            return None
        flops = self.analytic_flops + self.recompute_flops
        return flops / (self.devices * self.peak_tflops * 1e12)

    @property
    def tokens_per_second(self) -> float | None:
        """The matching upper bound on throughput, all devices."""
        seconds = self.step_seconds
        return None if seconds is None else self.batch_size * self.seq_len / seconds


def make_plan(cfg: ml_collections.ConfigDict, topology: Target | None = None) -> Plan:
    """Compile the configured train step abstractly and measure it; reads no weights. With a
    `topology`, for that TPU slice or those GPUs (see the module docstring), else for this
    machine."""
    devices = list(topology.devices) if topology else jax.devices()
    run = spec.resolve(cfg, devices)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices,
                              expert=cfg.mesh.expert)
    source, abstract = configured_model(run)

    # The step jaxft.train runs (train_step.build), on abstract arrays that carry shardings.
    step, states = train_step.build(abstract, run, mesh)
    placed = step.place(states)
    batch = abstract_batch(run, mesh)
    scalars = jax.tree.map(  # the step's running sums and its number: a few replicated scalars
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step.replicated),
        (train_step.zero_window(run.task, step.num_experts), train_step.step_number(0)))
    window, number = scalars
    lowered = step.train.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                               placed["opt_state"], window, batch, number)
    refusal, memory, xla_flops, warnings = None, _memory(None), None, []
    try:
        with progress.waiting("compiling the train step"):
            compiled, warnings = (topology.compile(lowered) if topology
                                  else (lowered.compile(), []))
        memory, xla_flops = _memory(compiled), _flops(compiled)
    except Exception as e:  # noqa: BLE001  (XLA raises its out-of-memory as a runtime error)
        refusal = topology.refusal(e) if topology else None
        if refusal is None and topology is not None:  # the compiler's failure, in one line
            first = next((line for line in str(e).splitlines() if line.strip()), repr(e))
            raise JaxftError(f"XLA could not compile the train step for {topology.name}: "
                             f"{first}") from None
        if refusal is None:
            raise

    rollout = _rollout_plan(run, step, placed, topology, abstract.config) if run.grpo else {}
    analytic, recompute = flops.step_flops(abstract, run)
    local_capacity, local_note = (None, "") if topology else host.usable_bytes(devices)
    packed_bytes, packed_params = quant.packed_size(abstract)
    total = lora.count_parameters(nnx.state(abstract, nnx.Param)) + packed_params
    return Plan(
        model_type=abstract.config.model_type, source=source, mesh=dict(mesh.shape),
        platform=run.platform, batch_size=run.train.batch_size,
        seq_len=cfg.data.max_len, accum_steps=run.train.accum_steps, remat=run.train.remat,
        param_dtype=run.train.param_dtype, compute_dtype=run.compute_dtype,
        lora_rank=None if run.lora is None else run.lora.rank,
        total_params=total,
        active_params=_active_params(abstract.config, total),
        adapter_params=lora.count_parameters(nnx.state(abstract, nnx.LoRAParam)),
        trainable_params=lora.count_parameters(placed["trainable"]),
        trainable=array_bytes(placed["trainable"]),
        frozen=array_bytes((placed["frozen"], placed["dropout"])),
        opt_state=array_bytes(placed["opt_state"]), batch=array_bytes((batch, scalars)),
        memory=memory, xla_flops=xla_flops, analytic_flops=analytic, recompute_flops=recompute,
        target=topology.describe() if topology else None,
        capacity=topology.usable_bytes() if topology else local_capacity,
        peak_tflops=topology.peak_tflops if topology else None, refusal=refusal,
        **({"compiler": topology.compiler, "device_word": topology.device_word,
            "memory_word": topology.memory_word, "capacity_note": topology.capacity_note(),
            "warnings": tuple(warnings)} if topology else
           {"capacity_note": local_note, "memory_word": "RAM" if run.platform == "cpu"
            else "memory"}),
        base_quant=run.quant.kind, packed_params=packed_params, packed_bytes=packed_bytes,
        reference=(array_bytes(placed["trainable"]) if run.reference == spec.FROZEN_COPY
                   else None),
        reference_of="GRPO" if run.task == tasks.GRPO else "DPO",
        **rollout,
    )


# ---------------------------------------------------------------------------------------------
# The abstract model and inputs
# ---------------------------------------------------------------------------------------------


def _rollout_plan(run: spec.RunSpec, step: train_step.Step, placed: dict[str, Any],
                  topology: Target | None, config: Any) -> dict[str, Any]:
    """GRPO's sampler compiled on the step's abstract weights, as `jaxft.rollout` jits it: its
    memory, and the KV cache its rows hold (layers × 2 × rows × (prompt + completion) ×
    key/value heads × head dim)."""
    from jaxft import rollout

    cfg, g = run.config, run.grpo
    rows = cfg.grpo.rollout_batch_size or run.train.batch_size
    width = cfg.data.max_len - g.max_completion_length
    sampler = rollout.make_sampler(step.eval_graphdef, step.shardings, step.mesh,
                                   prompt_width=width, completion_len=g.max_completion_length,
                                   filtered=g.filtered)
    lowered = sampler.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                            *rollout.abstract_sampler_args(rows, width))
    with progress.waiting("compiling the rollout sampler"):
        compiled = topology.compile(lowered)[0] if topology else lowered.compile()
    itemsize = np.dtype(config.dtype or run.train.param_dtype).itemsize
    cache = (config.num_hidden_layers * 2 * rows * cfg.data.max_len
             * config.num_key_value_heads * config.head_dim * itemsize)
    return {"rollout_memory": _memory(compiled), "rollout_cache": cache,
            "rollout_shape": (rows, width, g.max_completion_length)}


def configured_model(run: spec.RunSpec) -> tuple[str, nnx.Module]:
    """(source, the abstract model with its LoRA) that a run describes, from config.json
    alone: the model `jaxft.train` would load (`jaxft.hf.model`), as shapes only."""
    source, hf_config = hub.resolve_config(run.config.model.path)
    num_labels = ((run.config.model.num_labels or 2) if run.task == tasks.CLASSIFICATION
                  else None)
    plan = blueprint(hf_config, source, run.model_options(num_labels))
    if run.lora is None:
        return source, plan.abstract()
    return source, nnx.eval_shape(lambda: lora.apply_lora(plan.build(), run.lora,
                                                          seed=run.train.seed))


def abstract_batch(run: spec.RunSpec, mesh) -> dict[str, Any]:
    """The batch `jaxft.data` would produce for the run (`data.packing.batch_spec`), as shapes
    whose rows are sharded over the mesh's data axes."""
    found = batch_spec(run.task, run.train.batch_size, run.config.data.max_len,
                       ref_logps=run.batch_ref_logps,
                       completion_len=run.grpo.max_completion_length if run.grpo else 0,
                       old_logps=bool(run.grpo) and run.grpo.num_iterations > 1)
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, ndim=len(shape)))
            for k, (shape, dtype) in found.items()}


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


def _memory(compiled) -> dict[str, int]:
    m = None if compiled is None else compiled.memory_analysis()
    if m is None:  # some backends do not report it; or XLA refused to compile
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


def _active_params(cfg, total: int) -> int | None:
    """A mixture of experts' parameters one token meets: all but the experts it is not routed
    to (None: a dense model, where that is all of them)."""
    if not cfg.routes_tokens:
        return None
    idle = cfg.num_experts - cfg.num_experts_per_tok
    return total - cfg.expert_params * idle // cfg.num_experts


def describe(plan: Plan) -> str:
    """The dry run's report: one screen, per-device bytes first (that is what must fit)."""
    mesh = " × ".join(f"{k} {v}" for k, v in plan.mesh.items() if k != "expert" or v > 1)
    mode = "full fine-tuning" if plan.lora_rank is None else f"LoRA rank {plan.lora_rank}"
    share = 100 * plan.trainable_params / max(plan.total_params, 1)
    adam = plan.opt_state.total - 2 * plan.trainable.total
    device = plan.device_word
    where = (f"{plan.devices} {device}s" if plan.target
             else f"{plan.devices} {plan.platform} devices")
    rows = [
        ("trainable parameters", plan.trainable),
        ("frozen parameters", plan.frozen),
        ("optimizer state", plan.opt_state),
        ("batch", plan.batch),
        *([(f"reference copy ({plan.reference_of})", plan.reference)] if plan.reference
          else []),
    ]
    lines = [
        f"dry run: {plan.model_type} from {plan.source} (no weights read, nothing allocated)",
        *([f"  target: {plan.target}, compiled by {plan.compiler} on this host (no "
           f"{plan.compiler.split(':')[1]} needed)"] if plan.target else []),
        f"  {mode}; params {plan.param_dtype}, compute {plan.compute_dtype}; remat "
        f"{plan.remat}; mesh {mesh} ({where})",
        f"  step: {plan.batch_size} rows × {plan.seq_len} tokens = "
        f"{plan.batch_size * plan.seq_len:,} tokens, {plan.accum_steps} micro-batch(es)",
        f"parameters: {plan.trainable_params:,} trainable of {plan.total_params:,} "
        f"({share:.4g}%); base model {plan.total_params - plan.adapter_params:,}"
        + (f", {plan.active_params:,} active per token" if plan.active_params else ""),
        *([f"  base in {plan.base_quant}: {plan.packed_params:,} "
           f"{'expert' if plan.base_quant == 'mxfp4' else 'projection'} parameters in "
           f"{human_bytes(plan.packed_bytes)} ({plan.packed_bytes / plan.packed_params:.4f} "
           f"bytes each); the rest in {plan.param_dtype}"]
          if plan.packed_params else []),
        f"{'analytic bytes':<24}{'all devices':>14}{'per ' + device:>14}",
        *(f"  {name:<22}{human_bytes(b.total):>14}{human_bytes(b.per_device):>14}"
          for name, b in rows),
        f"  (optimizer state = 2 × trainable for AdamW's m and v, + {adam} B of step counters)",
        *_memory_lines(plan, device),
        "FLOPs per step:",
        f"  analytic {plan.analytic_flops:.3e} ({'6' if plan.lora_rank is None else '4'}"
        f"N·tokens + attention), {plan.analytic_flops / plan.devices:.3e} per {device}"
        + (f"; remat recomputes {plan.recompute_flops:.3e} more" if plan.recompute_flops
           else ""),
        *([f"  XLA cost_analysis {plan.xla_flops:.3e} per {device} (counts the scanned layers "
           "once: a lower bound)"] if plan.xla_flops and not plan.target else []),
        *_time_lines(plan, device),
    ]
    return "\n".join(lines)


def _memory_lines(plan: Plan, device: str) -> list[str]:
    m = plan.memory
    compiler = plan.compiler
    if plan.refusal is not None:
        needed, whole = tpu.required_bytes(plan.refusal) or (0, False)
        of = f"needs ≥ {human_bytes(plan.peak_bytes)} of {human_bytes(plan.capacity)}"
        how = (f"{of}, by {compiler}" if whole else
               f"{of}: {human_bytes(needed)} of temporaries, by {compiler}, + "
               f"{human_bytes(plan.argument_bytes)} of arguments")
        return [f"{compiler} memory per {device}: does not fit"
                + (f" ({how})" if needed and plan.capacity else ""),
                f"  {compiler} refused to compile the step: {plan.refusal}"]
    lines = [
        f"{compiler} memory per {device} (compiled.memory_analysis):",
        f"  arguments {human_bytes(m['argument'])} (parameters, optimizer state, batch), outputs "
        f"{human_bytes(m['output'])} ({human_bytes(m['alias'])} of them in donated buffers)",
        f"  temporaries {human_bytes(m['temp'])} (activations, gradients), generated code "
        f"{human_bytes(m['generated_code'])}",
        *([f"  + {plan.reference_of}'s frozen reference copy "
           f"{human_bytes(plan.reference_bytes)}, held beside the step (its own forward pass "
           "scores each batch first)"] if plan.reference else []),
    ]
    lines += [f"  {compiler} warned: {warning}" for warning in plan.warnings]
    if plan.rollout_memory is not None:
        rows, width, length = plan.rollout_shape
        r = plan.rollout_memory
        lines += [
            f"  train step peak ≈ {human_bytes(plan.step_peak_bytes)}",
            f"  GRPO rollout, {rows} rows × ({width} prompt + {length} completion) tokens: KV "
            f"cache {human_bytes(plan.rollout_cache)}; arguments {human_bytes(r['argument'])}, "
            f"temporaries {human_bytes(r['temp'])} (cache and logits), + the optimizer state "
            f"it leaves in place: peak ≈ {human_bytes(plan.rollout_peak_bytes)}"]
    if plan.fits is None:
        lines.append(f"  peak ≈ {human_bytes(plan.peak_bytes)} per {device}")
    else:
        share = f"{100 * plan.peak_bytes / plan.capacity:.0f}%"
        verdict = (f"fits ({share})" if plan.fits else
                   f"does not fit (needs {human_bytes(plan.peak_bytes)} of "
                   f"{human_bytes(plan.capacity)}, {share})")
        lines.append(f"  peak ≈ {human_bytes(plan.peak_bytes)} of {human_bytes(plan.capacity)} "
                     f"usable {plan.memory_word} per {device}: {verdict}")
        if plan.capacity_note:
            lines.append(f"  (usable: {plan.capacity_note})")
    if plan.platform == "cpu" and plan.compute_dtype != "float32":
        lines.append("  note: XLA:CPU computes half-precision matmuls on float32 copies of the "
                     "weights, so these temporaries overstate an accelerator's; plan on the "
                     "machine that will train, or for a TPU slice or GPU with --topology")
    return lines


def _time_lines(plan: Plan, device: str) -> list[str]:
    if plan.step_seconds is None:
        return []
    return [f"time at the {device}'s peak bf16 rate ({plan.peak_tflops:g} TFLOP/s per {device}; "
            "a bound no real step reaches):",
            f"  step ≥ {plan.step_seconds:.3g} s, ≤ {plan.tokens_per_second:,.0f} tokens/s "
            f"({plan.tokens_per_second / plan.devices:,.0f} per {device})"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_plan(cfg: ml_collections.ConfigDict, topology: str | None = None) -> Plan:
    """`--dry_run [--topology=v5e-8|h100]`: plan, print, return the plan."""
    plan = make_plan(cfg, target(topology) if topology else None)
    print(describe(plan))
    return plan

