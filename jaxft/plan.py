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

With a TPU slice as the target (`--topology=v5e-8`, `jaxft.tpu`) the step is compiled by XLA's
TPU compiler for the slice's compile-only devices, on any host: the memory figures are XLA:TPU's,
an out-of-memory refusal is a result ("does not fit", with XLA's figure), and the hardware
choices (attention kernel, compute dtype, cross-entropy chunk) are the TPU's. The FLOPs of the
step, remat's recomputation included, over the slice's peak bf16 rate bound its time from below.
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
from jaxft import dtypes, hf_io, hub, lora, progress, quant, sharding, tpu, train_step
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
    recompute_flops: float  # what remat recomputes in the backward pass, all devices
    target: str | None = None  # a TPU slice (`tpu.Topology.describe`); None: this machine
    capacity: int | None = None  # HBM one device lets a program use (TPU targets)
    peak_tflops: float | None = None  # per device, bf16 (TPU targets)
    refusal: str | None = None  # XLA's out-of-memory message when it would not compile
    base_quant: str = "none"  # how the frozen projections are stored (jaxft.quant)
    packed_params: int = 0  # parameters of the quantized projections
    packed_bytes: int = 0  # what they cost, codes and scales
    # DPO's frozen copy of the initial weights (full fine-tuning without precompute_ref): held
    # beside the step's arguments, and scoring each batch in its own, smaller forward pass
    reference: Bytes | None = None

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
        """One device's share of DPO's frozen reference copy (0: none)."""
        return 0 if self.reference is None else self.reference.per_device

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not written in place of a donated argument + temporaries; when
        XLA refused, at least the temporaries its message names plus the arguments."""
        if self.refusal is not None:
            needed, whole = tpu.required_bytes(self.refusal) or (0, False)
            return needed if whole else needed + self.argument_bytes
        m = self.memory
        return (m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
                + self.reference_bytes)

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


def make_plan(cfg: ml_collections.ConfigDict, topology: tpu.Topology | None = None) -> Plan:
    """Compile the configured train step abstractly and measure it; reads no weights. With a
    `topology`, for that TPU slice (see the module docstring), else for this machine."""
    devices = list(topology.devices) if topology else jax.devices()
    platform = "tpu" if topology else jax.default_backend()
    config_lib.validate(cfg, len(devices), platform)
    compute_dtype = config_lib.compute_dtype(cfg, platform)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    lora_cfg = config_lib.lora_config(cfg)
    source, abstract = configured_model(cfg, compute_dtype)

    # The step jaxft.train runs (train_step.build), on abstract arrays that carry shardings.
    step, states = train_step.build(abstract, cfg, mesh, lora_cfg)
    placed = step.place(states)
    reference_mode = config_lib.dpo_reference(cfg) if cfg.task == "dpo" else None
    batch = abstract_batch(cfg.task, cfg.train.batch_size, cfg.data.max_len, mesh,
                           ref_logps=reference_mode in ("precomputed", "frozen_copy"))
    scalars = jax.tree.map(  # the step's running sums and its number: a few replicated scalars
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step.replicated),
        (train_step.zero_window(cfg.task), train_step.step_number(0)))
    window, number = scalars
    lowered = step.train.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                               placed["opt_state"], window, batch, number)
    refusal, memory, xla_flops = None, _memory(None), None
    try:
        with progress.waiting("compiling the train step"):
            compiled = lowered.compile()
        memory, xla_flops = _memory(compiled), _flops(compiled)
    except Exception as e:  # noqa: BLE001  (XLA raises its out-of-memory as a runtime error)
        refusal = tpu.out_of_memory(e) if topology else None
        if refusal is None:
            raise

    tokens = cfg.train.batch_size * cfg.data.max_len * (2 if cfg.task == "dpo" else 1)
    full = lora_cfg is None
    # DPO scores the reference in each step (LoRA's base, or the frozen copy): one more forward.
    reference = reference_mode in ("adapters_off", "frozen_copy")
    packed_bytes, packed_params = quant.packed_size(abstract)
    return Plan(
        model_type=abstract.config.model_type, source=source, mesh=dict(mesh.shape),
        platform=platform, batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_len, accum_steps=cfg.train.accum_steps, remat=cfg.train.remat,
        param_dtype=cfg.train.param_dtype, compute_dtype=compute_dtype,
        lora_rank=None if lora_cfg is None else lora_cfg.rank,
        total_params=lora.count_parameters(nnx.state(abstract, nnx.Param)) + packed_params,
        adapter_params=lora.count_parameters(nnx.state(abstract, nnx.LoRAParam)),
        trainable_params=lora.count_parameters(placed["trainable"]),
        trainable=array_bytes(placed["trainable"]),
        frozen=array_bytes((placed["frozen"], placed["dropout"])),
        opt_state=array_bytes(placed["opt_state"]), batch=array_bytes((batch, scalars)),
        memory=memory, xla_flops=xla_flops,
        analytic_flops=analytic_flops(abstract, tokens, cfg.data.max_len, full=full,
                                      reference=reference),
        recompute_flops=recompute_flops(abstract, tokens, cfg.data.max_len, cfg.train.remat),
        target=topology.describe() if topology else None,
        capacity=tpu.usable_hbm(topology) if topology else None,
        peak_tflops=topology.chip.peak_tflops if topology else None, refusal=refusal,
        base_quant=config_lib.quant_config(cfg).kind, packed_params=packed_params,
        packed_bytes=packed_bytes,
        reference=array_bytes(placed["trainable"]) if reference_mode == "frozen_copy" else None,
    )


def flops_by_remat(cfg: ml_collections.ConfigDict, remats: tuple[str, ...]) -> dict[str, float]:
    """Each remat policy's step FLOPs (recomputation included), all devices, without compiling:
    what `jaxft.suggest` ranks candidates by before it compiles any."""
    _, abstract = configured_model(cfg, config_lib.compute_dtype(cfg, "tpu"))
    tokens = cfg.train.batch_size * cfg.data.max_len
    step = analytic_flops(abstract, tokens, cfg.data.max_len, full=not cfg.lora.enabled)
    return {remat: step + recompute_flops(abstract, tokens, cfg.data.max_len, remat)
            for remat in remats}


# ---------------------------------------------------------------------------------------------
# The abstract model and inputs
# ---------------------------------------------------------------------------------------------


def configured_model(cfg: ml_collections.ConfigDict, compute_dtype: str) -> tuple[str, nnx.Module]:
    """(source, the abstract model with its LoRA) that `cfg` describes, from config.json alone."""
    source, hf_config = hub.resolve_config(cfg.model.path)
    num_labels = (cfg.model.num_labels or 2) if cfg.task == "classification" else None
    return source, abstract_model(
        hf_config, source, param_dtype=cfg.train.param_dtype, compute_dtype=compute_dtype,
        num_labels=num_labels, remat=cfg.train.remat, attention=cfg.model.attention,
        lora_cfg=config_lib.lora_config(cfg), quantize=config_lib.quant_config(cfg),
        seed=cfg.train.seed)



def abstract_model(hf_config: dict, source: str, *, param_dtype: DTypeLike, compute_dtype: str,
                   num_labels: int | None, remat: str, attention: str,
                   lora_cfg: lora.LoraConfig | None, quantize: quant.QuantConfig | None = None,
                   seed: int = 0) -> nnx.Module:
    """The model `hf_io.load_model` would build (plus LoRA), as shapes only: with a quantized
    base, its packed kernels."""
    family, model_cfg = hf_io.model_config(hf_config, source, num_labels=num_labels,
                                           compute_dtype=compute_dtype, remat=remat,
                                           attention=attention)

    def build() -> nnx.Module:
        model = family.Model(model_cfg, rngs=nnx.Rngs(seed),
                             param_dtype=dtypes.jax_dtype(param_dtype))
        if quantize is not None and quantize.enabled:
            quant.quantize_kernels(model, quantize)
        if lora_cfg is not None:
            lora.apply_lora(model, lora_cfg, seed=seed)
        return model

    return nnx.eval_shape(build)


def abstract_batch(task: str, batch_size: int, seq_len: int, mesh,
                   ref_logps: bool = False) -> dict[str, Any]:
    """The batch `jaxft.data` would produce (see `jaxft.data.packing`), as sharded shapes;
    `ref_logps`: preference pairs carry their precomputed reference scores."""
    rows = sharding.batch_sharding(mesh)
    per_row = sharding.batch_sharding(mesh, ndim=1)

    def array(dtype, shape=(batch_size, seq_len)) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows if len(shape) == 2 else per_row)

    if task == "dpo":  # pairs: [B, 2, T], and which rows are real
        pairs = sharding.batch_sharding(mesh, ndim=3)
        pair = lambda dtype: jax.ShapeDtypeStruct((batch_size, 2, seq_len), dtype,  # noqa: E731
                                                  sharding=pairs)
        out = {"input_ids": pair(np.int32), "targets": pair(np.int32),
               "loss_mask": pair(np.float32), "segment_ids": pair(np.int32),
               "positions": pair(np.int32), "attention_mask": pair(np.int32),
               "valid": array(np.float32, (batch_size,))}
        if ref_logps:
            out["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), np.float32, sharding=rows)
        return out
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


def analytic_flops(model: nnx.Module, tokens: int, seq_len: int, *, full: bool,
                   reference: bool = False) -> float:
    """FLOPs of one step on all devices: the 6N·tokens rule, counted from the matmuls.

    A forward pass costs 2 FLOPs per weight per token; the backward pass costs 2 more for the
    activation gradients and, only for weights that train, 2 more for the weight gradients:
    6N·tokens in full fine-tuning, 4N·tokens when the base is frozen (LoRA), plus 6 per adapter
    weight. N counts the projection kernels (and a tied embedding, which is the output head);
    embedding lookups cost nothing. Attention scores and values add 4·T·width per token and
    layer forward, 3× that for a training step. Remat's recomputation is `recompute_flops`.
    `reference`: the step also runs the frozen base forward (DPO's reference under LoRA).
    """
    matmul, adapters, attention = _forward_terms(model, seq_len)
    extra = 2 * matmul + attention if reference else 0
    return float(tokens * ((6 if full else 4) * matmul + 6 * adapters + 3 * attention + extra))


def recompute_flops(model: nnx.Module, tokens: int, seq_len: int, remat: str) -> float:
    """What remat adds to a step: `full` runs each layer's forward again in the backward pass
    (the output head and loss are outside the layers and are not rerun); `dots_saveable` keeps
    the projections' outputs and reruns only the rest, of which attention is the part that
    counts; `none` reruns nothing."""
    if remat == "none":
        return 0.0
    matmul, adapters, attention = _forward_terms(model, seq_len, layers_only=True)
    per_token = attention if remat == "dots_saveable" else 2 * (matmul + adapters) + attention
    return float(tokens * per_token)


def _forward_terms(model: nnx.Module, seq_len: int,
                   layers_only: bool = False) -> tuple[int, int, int]:
    """Per token: the base matmul weights N, the adapter weights, and attention's forward
    FLOPs (4·T·width per layer)."""
    cfg = model.config
    linears = [linear for _, linear in lora.linear_modules(model)
               if not layers_only or _stacked(linear)]
    matmul = sum(math.prod(linear.kernel_shape) for linear in linears)
    adapters = sum(lora.count_parameters(nnx.state(linear, nnx.LoRAParam)) for linear in linears)
    if cfg.tie_word_embeddings and not layers_only:
        matmul += cfg.vocab_size * cfg.hidden_size
    width = cfg.head_dim * cfg.num_attention_heads
    return matmul, adapters, 4 * seq_len * width * cfg.num_hidden_layers


def _stacked(linear: nnx.Module) -> bool:
    """A projection inside the scanned layers: its kernel carries the leading `layers` axis."""
    return linear.kernel_axes[:1] == ("layers",)


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


def describe(plan: Plan) -> str:
    """The dry run's report: one screen, per-device bytes first (that is what must fit)."""
    mesh = " × ".join(f"{k} {v}" for k, v in plan.mesh.items())
    mode = "full fine-tuning" if plan.lora_rank is None else f"LoRA rank {plan.lora_rank}"
    share = 100 * plan.trainable_params / max(plan.total_params, 1)
    adam = plan.opt_state.total - 2 * plan.trainable.total
    where = f"{plan.devices} chips" if plan.target else f"{plan.devices} {plan.platform} devices"
    device = "chip" if plan.target else "device"
    rows = [
        ("trainable parameters", plan.trainable),
        ("frozen parameters", plan.frozen),
        ("optimizer state", plan.opt_state),
        ("batch", plan.batch),
        *([("reference copy (DPO)", plan.reference)] if plan.reference else []),
    ]
    lines = [
        f"dry run: {plan.model_type} from {plan.source} (no weights read, nothing allocated)",
        *([f"  target: {plan.target}, compiled by XLA:TPU on this host (no TPU needed)"]
          if plan.target else []),
        f"  {mode}; params {plan.param_dtype}, compute {plan.compute_dtype}; remat "
        f"{plan.remat}; mesh {mesh} ({where})",
        f"  step: {plan.batch_size} rows × {plan.seq_len} tokens = "
        f"{plan.batch_size * plan.seq_len:,} tokens, {plan.accum_steps} micro-batch(es)",
        f"parameters: {plan.trainable_params:,} trainable of {plan.total_params:,} "
        f"({share:.4g}%); base model {plan.total_params - plan.adapter_params:,}",
        *([f"  base in {plan.base_quant}: {plan.packed_params:,} projection parameters in "
           f"{human_bytes(plan.packed_bytes)} ({plan.packed_bytes / plan.packed_params:.4f} "
           f"bytes each); embeddings and output head in {plan.param_dtype}"]
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
    compiler = "XLA:TPU" if plan.target else "XLA"
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
        *([f"  + DPO's frozen reference copy {human_bytes(plan.reference_bytes)}, held beside "
           "the step (its own forward pass scores each batch first)"] if plan.reference else []),
    ]
    if plan.fits is None:
        lines.append(f"  peak ≈ {human_bytes(plan.peak_bytes)} per {device}")
    else:
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(f"  peak ≈ {human_bytes(plan.peak_bytes)} of {human_bytes(plan.capacity)} "
                     f"usable HBM per {device}: {verdict} "
                     f"({100 * plan.peak_bytes / plan.capacity:.0f}%)")
    if plan.platform == "cpu" and plan.compute_dtype != "float32":
        lines.append("  note: XLA:CPU computes half-precision matmuls on float32 copies of the "
                     "weights, so these temporaries overstate an accelerator's; plan on the "
                     "machine that will train, or for a TPU slice with --topology")
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
    """`--dry_run [--topology=v5e-8]`: plan, print, return the plan."""
    plan = make_plan(cfg, tpu.topology(topology) if topology else None)
    print(describe(plan))
    return plan

