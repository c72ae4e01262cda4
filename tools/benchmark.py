"""Fine-tuning throughput: jaxft against PyTorch+PEFT, side by side on this machine.

    python tools/benchmark.py                         # LoRA and full FT: ~1 min on 2 CPUs
    python tools/benchmark.py --repeat 3 --profile    # on a shared machine; + where time goes
    python tools/benchmark.py --scaling --json runs/benchmark.json   # + 4/8/16 layers, T 128-512
    python tools/benchmark.py --modes lora,qlora      # LoRA against QLoRA (an NF4 base)
    python tools/benchmark.py --quick                 # smoke run (tests/test_benchmark.py)
    python tools/benchmark.py --gpu-suite             # on one GPU: 1B and 8B Llama, bf16 (~8 min)
    python tools/benchmark.py --grpo                  # a GRPO step against TRL's GRPOTrainer

Each (implementation, mode) runs in its own subprocess, so peak host memory (RSS) is its own and
neither library's thread pools or allocator see the other's. Both build the same random-init
Llama shape from one `config.json`-style dict (no checkpoint to write or read, so an 8B shape
costs nothing to set up), get the same batch, the same thread count (CPU affinity plus
torch.set_num_threads), and AdamW with global-norm clipping at 1.0. Tokens/s is the median of
the timed steps after warm-up. jaxft's compile time is `lower().compile()` of the whole step;
PyTorch eager has none, and under `torch.compile` (impl `torch_compile`) its compile time is the
first step's time less a timed step's. Every worker runs with
glibc's transparent huge pages (`--default-malloc` to turn off): both runtimes re-allocate their
step buffers each step, and in 4 KiB pages that costs XLA ~10^5 page faults a step. The `load`
column is the 1-minute load average as a worker finished, its own threads included: above the
thread count, something else shared the CPUs and `--repeat` keeps each worker's fastest run.

MFU divides the model FLOPs of a step by the machine's measured peak matmul rate (the better of
a large float32 jnp and torch matmul, each measured in its own subprocess):
    full FT : 6·N·tokens + 12·L·T·D·tokens
    LoRA    : 4·N·tokens + 6·N_lora·tokens + 12·L·T·D·tokens
N counts the weights of every matmul (layers and output head, not the embedding lookup); the
frozen base of LoRA needs no weight gradients, hence 4 rather than 6. 12·L·T·D·tokens is dense
attention: QKᵀ and PV forward (2·2·T·D per token and layer), twice that backward. The count is
jaxft's FLOPs model (`jaxft.plan.flops`, the dry run's), used for both implementations; each
PyTorch row also records what PyTorch's own FLOP counter sees in its step (`counted_flops`),
which the tests hold the model to.

On a GPU (`--dtype auto`, `--param-dtype auto`) both run in bfloat16, weights and compute, as
the usual recipe for one card is: PyTorch with bfloat16 weights under bfloat16 autocast, PEFT's
adapters in float32 (its `autocast_adapter_dtype`); jaxft with `train.param_dtype=bfloat16`,
float32 adapters, and AdamW moments in the parameters' dtype for full fine-tuning (as
torch.optim.AdamW keeps them) and float32 for LoRA. Peak GPU memory is
`torch.cuda.max_memory_allocated` and XLA's `peak_bytes_in_use`. `--gpu-suite` runs the whole
comparison of the GPU presets (`--preset llama1b|llama8b`: Llama-3.2-1B and Llama-3-8B shapes,
vocabulary 128256, GQA 32/8, rope theta 5e5; the 1B ties its embeddings as the real one does),
including PEFT under torch.compile and jaxft's rematerialisation policies, and takes MFU against
the card's dense bfloat16 peak (989 TFLOP/s on an H100/H200, PaLM's convention) rather than the
measured one. A worker that fails (out of memory, say) leaves a row with its error, not a hole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 1e-4

# The GPU shapes: Llama-3.2-1B (tied embeddings) and Llama-3-8B, at the batches one card trains.
PRESETS = {
    "llama1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8,
                    vocab=128256, rope_theta=500000.0, tied=True, batch=8, seq=2048,
                    steps=10, warmup=3),
    "llama8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8,
                    vocab=128256, rope_theta=500000.0, tied=False, batch=4, seq=2048,
                    steps=10, warmup=3),
}
# What `--gpu-suite` runs: (preset, impl, mode, overrides), in this order.
GPU_SUITE = (
    ("llama1b", "jaxft", "lora", {}),
    ("llama1b", "torch", "lora", {}),
    ("llama1b", "torch_compile", "lora", {}),
    ("llama1b", "jaxft", "full", {}),
    ("llama1b", "torch", "full", {}),
    ("llama1b", "jaxft", "lora", {"remat": "dots_saveable"}),
    ("llama1b", "jaxft", "lora", {"remat": "full"}),
    ("llama8b", "jaxft", "lora", {}),
    ("llama8b", "jaxft", "lora", {"remat": "dots_saveable"}),
    ("llama8b", "torch", "lora", {}),
)
WORKER_TIMEOUT_S = 900  # one (implementation, mode) run, compile included
# Dense bfloat16 peak of a card, FLOP/s, for MFU in PaLM's convention.
SPEC_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = same as --heads")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=0, help="0 = every CPU this process may use")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every worker this many times, interleaved, and keep each one's "
                        "fastest run: on a shared machine, the runs least disturbed by others")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on GPU")
    p.add_argument("--param-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights' dtype; auto = float32 on CPU, bfloat16 on GPU")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    p.add_argument("--remat", default="none", help="jaxft's train.remat policy")
    p.add_argument("--attention", default="auto", help="jaxft's model.attention kernel")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a GPU shape (overrides the sizes)")
    p.add_argument("--gpu-suite", action="store_true",
                   help="the whole GPU comparison: both presets, torch.compile, remat policies")
    p.add_argument("--suite-presets", default="llama1b,llama8b",
                   help="--gpu-suite: which presets to run (to split it over two calls)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="MFU denominator (0 = the measured peak; --gpu-suite: the card's spec)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is (default: transparent huge pages for every "
                        "worker, GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")
    p.add_argument("--impls", default="jaxft,torch", help="jaxft, torch, torch_compile")
    p.add_argument("--modes", default="lora,full",
                   help="lora, full, qlora (LoRA on an NF4 base: jaxft.quant vs bitsandbytes)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 timed step: a smoke run")
    p.add_argument("--grpo", action="store_true",
                   help="a GRPO step (rollout and train) against TRL: tools/benchmark_grpo.py")
    p.add_argument("--scaling", action="store_true",
                   help="also LoRA at 4/8/16 layers and 128/256/512 tokens")
    p.add_argument("--profile", action="store_true", help="also jaxft's top XLA ops per mode")
    p.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # impl:mode, run inside a subprocess
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--peak-n", type=int, default=0, help=argparse.SUPPRESS)  # matmul side
    args = p.parse_args(argv)
    if args.preset and not args.worker:  # a worker gets the sizes themselves (maybe shrunk)
        for field, value in PRESETS[args.preset].items():
            setattr(args, field, value)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab = 64, 2, 128, 4, 256
        args.batch, args.seq, args.rank, args.steps, args.warmup = 2, 32, 4, 1, 1
    args.kv_heads = args.kv_heads or args.heads
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


SHAPE_FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq",
                "rank", "threads", "rope_theta", "tied", "remat", "attention", "param_dtype",
                "preset")


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def model_flops(a, mode: str) -> float:
    """jaxft's FLOPs model (`jaxft.plan.flops`) of the benchmark's step, from the abstract model
    (no weights allocated): the numerator of every row's MFU, PyTorch's included, so the two
    implementations are measured against the same work."""
    import jax
    from flax import nnx

    from jaxft.plan import flops

    mode = "lora" if mode == "qlora" else mode  # the same matmuls, on a dequantized base
    run = jaxft_run(a, mode, jax.devices("cpu")[:1])
    abstract = nnx.eval_shape(lambda: jaxft_model(a, mode, run))
    return sum(flops.step_flops(abstract, run, "none"))


def counted_torch_flops(a, mode: str) -> float:
    """The FLOPs PyTorch's own counter (`torch.utils.flop_counter`) sees in one forward and
    backward of the same model under PEFT, on the meta device (nothing computed or allocated):
    the independent count that `model_flops` is held to. The embedding is made to require a
    gradient, so the first layer's input gradient is taken as in jaxft's scanned layers (which
    cannot skip it for one layer)."""
    import peft
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**hf_config(a)), dtype=torch.float32,
            attn_implementation="eager")
        if mode in ("lora", "qlora"):
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=a.rank, lora_alpha=2.0 * a.rank, target_modules=list(TARGETS)))
        model.get_input_embeddings().weight.requires_grad_(True)
        ids = torch.zeros((a.batch, a.seq), dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON row as its last line
# ---------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def hf_config(a) -> dict:
    """The benchmark's model as a Hugging Face `config.json` dict; both implementations build it."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": a.vocab,
            "hidden_size": a.hidden, "intermediate_size": a.intermediate,
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "max_position_embeddings": max(a.seq, 128),
            "rope_theta": a.rope_theta, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": a.tied}


def dtypes_for(a, accelerator: bool) -> tuple[str, str]:
    """(parameter dtype, compute dtype): `auto` is bfloat16 on an accelerator, else float32."""
    auto = "bfloat16" if accelerator else "float32"
    return ({"auto": auto}.get(a.param_dtype, a.param_dtype),
            {"auto": auto}.get(a.dtype, a.dtype))


def make_batch(a):
    import numpy as np

    ids = np.random.RandomState(0).randint(1, a.vocab, (a.batch, a.seq)).astype(np.int32)
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0  # the last token has no next token, as in HF's shifted loss
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
            "segment_ids": np.ones(ids.shape, np.int32),
            "positions": np.tile(np.arange(a.seq, dtype=np.int32), (a.batch, 1))}


def peak_jax(a) -> dict:
    import jax
    import jax.numpy as jnp

    n = a.peak_n or (4096 if jax.default_backend() == "cpu" else 8192)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(x, x).block_until_ready()
    t = min(timed(lambda: f(x, x).block_until_ready(), 10))
    return {"impl": "jax", "mode": "peak_matmul", "flops_per_s": 2 * n**3 / t,
            "matmul": f"{n}x{n} {jnp.dtype(dtype).name}"}


def peak_torch(a) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (4096, torch.float32)
    n = a.peak_n or n
    x = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x @ x
    sync()
    t = min(timed(lambda: (x @ x, sync()), 10))
    return {"impl": "torch", "mode": "peak_matmul", "flops_per_s": 2 * n**3 / t,
            "matmul": f"{n}x{n} {str(dtype).removeprefix('torch.')}"}


def jaxft_run(a, mode: str, devices):
    """The run's `RunSpec`, as `jaxft.train` resolves it: AdamW at a constant rate, clipping at
    1.0, LoRA (`lora`, `qlora`) on TARGETS, or full fine-tuning."""
    from jaxft import config, spec

    accelerator = devices[0].platform != "cpu"
    param_dtype, compute = dtypes_for(a, accelerator)
    cfg = config.base_config()
    cfg.model.path = "benchmark (random weights)"
    cfg.model.attention = a.attention
    cfg.data.train_path = "benchmark (one random batch)"
    cfg.data.max_len = a.seq
    cfg.train.batch_size, cfg.train.remat = a.batch, a.remat
    cfg.train.param_dtype, cfg.train.compute_dtype = param_dtype, compute
    cfg.train.steps = a.steps + a.warmup + 1
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps = LR, "constant", 0
    # Moments as torch.optim.AdamW keeps them: in the weights' dtype (LoRA's are float32).
    cfg.train.optimizer_state_dtype = param_dtype if mode == "full" else "float32"
    cfg.lora.enabled = mode in ("lora", "qlora")
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = a.rank, 2.0 * a.rank, TARGETS
    return spec.resolve(cfg, devices)


def jaxft_model(a, mode: str, run):
    """The benchmark's model (`jaxft.hf.model`'s blueprint of `hf_config(a)`), with its
    adapters; initialised with random weights unless `abstract`."""
    from jaxft import lora, quant
    from jaxft.hf.model import blueprint

    # A quantized base is packed from random dense weights, as a checkpoint's would be.
    options = dataclasses.replace(run.model_options(), quantize=None)
    model = blueprint(hf_config(a), "benchmark", options).initialised()
    if mode == "qlora":  # the base in NF4, as bitsandbytes stores it
        quant.quantize_model(model, quant.QuantConfig(quant.NF4))
    if run.lora is not None:
        lora.apply_lora(model, run.lora)
    return model


def run_jaxft(a, mode: str) -> dict:
    import jax

    from jaxft import sharding, train_step

    start_rss = rss_mb()
    accelerator = jax.default_backend() != "cpu"
    run = jaxft_run(a, mode, jax.devices()[:1])
    compute = run.compute_dtype
    model = jaxft_model(a, mode, run)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    step, states = train_step.build(model, run, mesh)
    del model
    placed = step.place(states)
    trainable, frozen, dropout = placed["trainable"], placed["frozen"], placed["dropout"]
    batch = jax.device_put(make_batch(a), sharding.batch_sharding(mesh))
    number = train_step.step_number(0)

    start = time.perf_counter()
    compiled = step.train.lower(trainable, frozen, dropout, placed["opt_state"],
                                step.zero_window(), batch, number).compile()
    compile_s = time.perf_counter() - start
    row: dict = {"compile_s": compile_s, "dtype": compute}
    if accelerator:  # model.attention 'auto' resolved, for the table
        row["attention"] = a.attention if a.attention != "auto" else (
            "cudnn" if jax.default_backend() == "gpu" and compute != "float32" else "xla")
    memory = compiled.memory_analysis()
    if memory is not None:  # bytes XLA plans for the step: arguments, outputs, temporaries
        row["xla_argument_mb"] = memory.argument_size_in_bytes / 2**20
        row["xla_output_mb"] = memory.output_size_in_bytes / 2**20
        row["xla_alias_mb"] = memory.alias_size_in_bytes / 2**20
        row["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
        # What `--dry_run` reports for this step (its per-device peak), beside the measured
        # `peak_bytes_in_use` on a GPU: how close the compiler's count is to the real thing.
        row["planned_peak_mb"] = (row["xla_argument_mb"] + row["xla_output_mb"]
                                  - row["xla_alias_mb"] + row["xla_temp_mb"])
    cost = compiled.cost_analysis()
    if cost and "flops" in cost:
        row["xla_flops"] = float(cost["flops"])
    state = {"trainable": trainable, "opt_state": placed["opt_state"]}

    def one_step():
        state["trainable"], state["opt_state"], window = compiled(
            state["trainable"], frozen, dropout, state["opt_state"], step.zero_window(), batch,
            number)
        jax.block_until_ready(state["trainable"])
        window = jax.device_get(window)  # as PyTorch's loss.item(), once per step
        state["loss"] = float(window["loss_sum"] / window["count"])

    first = timed(one_step, 1)[0]
    timed(one_step, a.warmup)
    if a.profile:
        row["profile"] = profile_ops(one_step, compiled.as_text())
    times = timed(one_step, a.steps)
    row.update(first_step_s=first, step_times=times, loss=state["loss"],
               peak_rss_mb=peak_rss_mb(), runtime_rss_mb=start_rss)
    stats = jax.devices()[0].memory_stats() if accelerator else None
    if stats and "peak_bytes_in_use" in stats:
        row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return row


def profile_ops(one_step, hlo_text: str, top: int = 12) -> dict:
    """Where a step's time goes, from a `jax.profiler` trace of two steps.

    XLA:CPU records one event per executed op (thunk); each op's self time (minus the ops nested
    in it, such as a while loop's body) is attributed to the op and, through the `op_name` of
    the compiled HLO, to a scope: forward or backward (`transpose(jvp`) of attention, mlp, the
    fused head + cross-entropy, the optimizer, or the rest. On a GPU only the device plane's
    "XLA Ops" line is read (its kernels, once each; the stream lines repeat them).
    """
    import re

    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            one_step()
            one_step()
        (path,) = Path(logdir).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    totals: dict[str, float] = {}
    gpu = jax.default_backend() == "gpu"
    for plane in data.planes:
        if gpu and not plane.name.startswith("/device:GPU"):
            continue
        lines = list(plane.lines)
        if any(line.name == "XLA Ops" for line in lines):
            lines = [line for line in lines if line.name == "XLA Ops"]
        for line in lines:
            events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events
                             if any(k == "hlo_op" for k, _ in e.stats)), key=lambda e: e[0])
            stack: list[list] = []  # [end, name, self time] of the enclosing ops
            for start, duration, name in events:
                while stack and stack[-1][0] <= start:
                    _, done, self_ns = stack.pop()
                    totals[done] = totals.get(done, 0.0) + self_ns
                if stack:
                    stack[-1][2] -= duration
                stack.append([start + duration, name, duration])
            for _, done, self_ns in stack:
                totals[done] = totals.get(done, 0.0) + self_ns
    info = {}  # op -> (shape, op_name, kind)
    for line in hlo_text.splitlines():
        op = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if op:
            name = re.search(r'op_name="([^"]*)"', line)
            kind = ("attention kernels (cuDNN)" if "cudnn" in line else
                    "matmul fusions" if re.search(r"gemm|cublas| dot\(", line) else "")
            info[op.group(1)] = (op.group(2).split("{")[0], name.group(1) if name else "", kind)

    def scope(op: str) -> str:
        name = info.get(op, ("", "", ""))[1]
        where = next((s for s in ("attention", "mlp", "cross_entropy", "optimizer")
                      if f"/{s}/" in name + "/"), "other")
        return where if where == "optimizer" else \
            f"{'backward' if 'transpose(jvp' in name else 'forward'} {where}"

    grand = sum(totals.values()) or 1.0
    scopes: dict[str, float] = {}
    for op, ns in totals.items():
        scopes[scope(op)] = scopes.get(scope(op), 0.0) + ns
    kinds: dict[str, float] = {}
    for op, ns in totals.items():
        kind = info.get(op, ("", "", ""))[2] or (
            "matmul fusions" if op.startswith(("ynn_fusion", "dot")) else
            "scan slices in/out" if "dynamic-" in op else
            "copies, transposes, broadcasts" if op.startswith(("copy", "transpose", "wrapped_b"))
            else "elementwise and reductions")
        kinds[kind] = kinds.get(kind, 0.0) + ns
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    ms = lambda ns: ns / 2 / 1e6  # noqa: E731 (two traced steps)
    return {
        "total_ms": ms(grand),
        "scopes": {k: ms(v) for k, v in sorted(scopes.items(), key=lambda kv: -kv[1])},
        "kinds": {k: ms(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": op, "ms": ms(ns), "shape": info.get(op, ("", "", ""))[0],
                     "scope": scope(op)} for op, ns in ranked],
    }


def run_torch(a, mode: str, compiled: bool = False) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers

    start_rss = rss_mb()
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    param_dtype, compute = dtypes_for(a, cuda)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**hf_config(a)), dtype=getattr(torch, param_dtype),
            attn_implementation="sdpa")
    if mode == "qlora":  # through a checkpoint, as bitsandbytes quantizes on from_pretrained
        with tempfile.TemporaryDirectory() as saved:
            model.save_pretrained(saved)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                saved, dtype=getattr(torch, param_dtype), attn_implementation="sdpa",
                device_map=device, quantization_config=transformers.BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=getattr(torch, compute)))
    if mode in ("lora", "qlora"):
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=a.rank, lora_alpha=2.0 * a.rank, target_modules=list(TARGETS), lora_dropout=0.0))
    model.train()
    if compiled:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(make_batch(a)["input_ids"].astype(np.int64)).to(device)
    autocast = torch.autocast(device, dtype=getattr(torch, compute), enabled=compute != "float32")
    state = {}

    def one_step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["loss"] = loss.item()  # synchronises, as jaxft's step does
        if cuda:
            torch.cuda.synchronize()

    if cuda:  # the peak from here on: weights, optimizer, the step (not the initialisation)
        torch.cuda.reset_peak_memory_stats()
    first = timed(one_step, 1)[0]
    timed(one_step, a.warmup)
    times = timed(one_step, a.steps)
    compile_s = first - statistics.median(times) if compiled else None
    row = {"compile_s": compile_s, "dtype": compute, "first_step_s": first, "step_times": times,
           "loss": state["loss"], "peak_rss_mb": peak_rss_mb(), "runtime_rss_mb": start_rss,
           "counted_flops": counted_torch_flops(a, mode)}
    if cuda:
        row["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def worker(a) -> dict:
    impl, mode = a.worker.split(":")
    if impl == "peak":
        return {**(peak_jax(a) if mode == "jax" else peak_torch(a)), "load": os.getloadavg()[0]}
    if impl == "jaxft":
        row = run_jaxft(a, mode)
    else:
        row = run_torch(a, mode, compiled=impl == "torch_compile")
    tokens = a.batch * a.seq
    median = statistics.median(row["step_times"])
    row.update(impl=impl, mode=mode, tokens_per_s=tokens / median, step_s=median)
    row.update({f: getattr(a, f) for f in SHAPE_FIELDS})
    row["load"] = os.getloadavg()[0]  # what else ran on this machine meanwhile
    return row


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def spawn(a, job: str, profile: bool = False, **overrides) -> dict:
    """Run one worker in a fresh interpreter pinned to `threads` CPUs; returns its row."""
    flags = {f: overrides.get(f, getattr(a, f)) for f in SHAPE_FIELDS}
    flags.update(steps=overrides.get("steps", a.steps), warmup=overrides.get("warmup", a.warmup),
                 dtype=a.dtype, peak_n=1024 if a.quick else 0)
    cmd = [sys.executable, __file__, "--worker", job]
    for k, v in flags.items():
        if v is None or v is False:
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    if profile:
        cmd.append("--profile")
    env = dict(os.environ)
    # One host device (the test suite asks for eight), and nothing printed but our JSON.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not a.default_malloc:
        # Both runtimes free and re-allocate their step buffers (XLA's ~100s of MB of temporaries)
        # every step; in 4 KiB pages each step then pays ~10^5 page faults, in 2 MiB pages ~10^3.
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    cpus = sorted(os.sched_getaffinity(0))[: flags["threads"]]
    try:
        proc = subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), *cmd], env=env,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{job} failed:\nno result after {WORKER_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if "step_s" in row:
        row["model_flops"] = model_flops(argparse.Namespace(**{**vars(a), **flags}), row["mode"])
    return row


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--grpo" in argv:  # a GRPO step against TRL's GRPOTrainer: tools/benchmark_grpo.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import benchmark_grpo

        return benchmark_grpo.main(argv)
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return []
    begin = time.perf_counter()
    peaks: dict[str, dict] = {}  # impl -> its fastest peak-matmul run

    def measure_peaks() -> None:
        for impl in ("jax", "torch"):
            run = spawn(a, f"peak:{impl}")
            if run["flops_per_s"] > peaks.get(impl, {}).get("flops_per_s", 0):
                peaks[impl] = run

    rows = gpu_suite(a, measure_peaks) if a.gpu_suite else cpu_runs(a, measure_peaks)
    peak = a.peak_tflops * 1e12 or max(p["flops_per_s"] for p in peaks.values())
    for row in rows:
        if "step_s" in row:
            row["mfu"] = row["model_flops"] / row["step_s"] / peak
    report(a, rows, list(peaks.values()), peak, time.perf_counter() - begin)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(list(peaks.values()) + rows, indent=1))
    return list(peaks.values()) + rows


def cpu_runs(a, measure_peaks) -> list[dict]:
    """The main comparison (best of `--repeat` rounds), then the `--scaling` sweeps."""
    impls, modes = a.impls.split(","), a.modes.split(",")
    rows = []

    def sweep(label: str, **shape) -> None:
        best: dict = {}
        for _ in range(a.repeat):
            if not label:  # in every round, so one busy moment cannot lower it for good
                measure_peaks()
            for mode in (modes if not label else ["lora"]):
                for impl in impls:
                    row = spawn(a, f"{impl}:{mode}",
                                profile=a.profile and impl == "jaxft" and not label, **shape)
                    print(f"  {label or 'main':>7} {impl:>5} {mode:>4}: "
                          f"{row['tokens_per_s']:8.0f} tok/s  (load {row['load']:.1f})",
                          file=sys.stderr, flush=True)
                    if row["step_s"] < best.get((impl, mode), {}).get("step_s", 1e9):
                        best[impl, mode] = row
        for row in best.values():
            row["sweep"] = label
            rows.append(row)

    sweep("")
    if a.scaling:
        for layers in (4, 8, 16):
            if layers != a.layers:
                sweep("depth", layers=layers)
        for seq in (128, 256, 512):
            if seq != a.seq:
                sweep("length", seq=seq)
    return rows


def gpu_suite(a, measure_peaks) -> list[dict]:
    """`GPU_SUITE` on this machine's one GPU; MFU against the card's spec peak if known."""
    measure_peaks()
    if not a.peak_tflops:
        name = gpu_name()
        a.peak_tflops = next((v / 1e12 for k, v in SPEC_PEAK_BF16.items() if k in name), 0.0)
    wanted = a.suite_presets.split(",")
    rows = []
    for preset, impl, mode, extra in GPU_SUITE:
        if preset not in wanted:
            continue
        shape = {**PRESETS[preset], "preset": preset, **extra}
        if a.quick:  # the suite's plumbing on a tiny shape (tests/test_benchmark.py)
            shape.update(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256,
                         batch=2, seq=32, steps=1, warmup=0)
        label = f"{preset} {impl} {mode} {extra.get('remat', '')}"
        try:
            row = spawn(a, f"{impl}:{mode}", profile=a.profile and impl == "jaxft" and not extra,
                        **shape)
            print(f"  {label}: {row['tokens_per_s']:8.0f} tok/s", file=sys.stderr, flush=True)
        except RuntimeError as e:  # out of memory, say: recorded, and the suite goes on
            error = str(e).strip().splitlines()[-1][:300]
            print(f"  {label}: FAILED {error}", file=sys.stderr, flush=True)
            row = {"impl": impl, "mode": mode, "error": error, "model_flops": 0,
                   **{f: shape.get(f, getattr(a, f)) for f in SHAPE_FIELDS}}
        row["sweep"] = preset
        rows.append(row)
    return rows


def gpu_name() -> str:
    """The GPU's marketing name (nvidia-smi), e.g. 'NVIDIA H200'; '' without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def report(a, rows: list[dict], peaks: list[dict], peak: float, seconds: float) -> None:
    if not a.gpu_suite:
        print(f"\nLlama D={a.hidden} L={a.layers} F={a.intermediate} heads={a.heads}/{a.kv_heads}"
              f" V={a.vocab}; batch {a.batch}×{a.seq} tokens; LoRA rank {a.rank} on "
              f"{len(TARGETS)} projections; {a.threads} thread(s) per process; best of "
              f"{a.repeat} run(s)")
    else:
        print(f"\nGPU suite on {gpu_name() or 'no GPU'}; LoRA rank {a.rank} on {len(TARGETS)} "
              f"projections; " + "; ".join(
                  f"{k}: D={v['hidden']} L={v['layers']} F={v['intermediate']} V={v['vocab']} "
                  f"batch {v['batch']}×{v['seq']}" for k, v in PRESETS.items()))
    for p in peaks:
        print(f"peak matmul ({p['impl']}, {p['matmul']}): {p['flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"MFU = model FLOPs / step time / {peak / 1e12:.1f} TFLOP/s;  full: 6·N·tok + "
          f"12·L·T·D·tok,  LoRA: 4·N·tok + 6·N_lora·tok + 12·L·T·D·tok")
    head = (f"{'sweep':>7} {'impl':>13} {'mode':>5} {'remat':>13} {'L':>3} {'T':>4} {'tok/s':>8} "
            f"{'step s':>7} {'MFU':>5} {'compile s':>9} {'peak RSS MB':>11} {'GPU peak MB':>11} "
            f"{'planned MB':>10} {'XLA arg+tmp MB':>14} {'load':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = (f"{r['sweep'] or 'main':>7} {r['impl']:>13} {r['mode']:>5} "
                f"{r['remat'] if r['impl'] == 'jaxft' else '-':>13} {r['layers']:>3} "
                f"{r['seq']:>4}")
        if "error" in r:
            print(f"{lead} failed: {r['error'][:120]}")
            continue
        xla = (f"{r['xla_argument_mb'] + r['xla_temp_mb']:.0f}" if "xla_temp_mb" in r else "-")
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        gpu = f"{r['device_peak_mb']:.0f}" if "device_peak_mb" in r else "-"
        planned = f"{r['planned_peak_mb']:.0f}" if "planned_peak_mb" in r else "-"
        print(f"{lead} {r['tokens_per_s']:>8.0f} {r['step_s']:>7.3f} {r['mfu']:>5.0%} "
              f"{compile_s:>9} {r['peak_rss_mb']:>11.0f} {gpu:>11} {planned:>10} {xla:>14} "
              f"{r['load']:>4.1f}")
    ok = [r for r in rows if "error" not in r]
    main_rows = {(r["sweep"], r["impl"], r["mode"]): r for r in ok
                 if r["sweep"] in ("", *PRESETS) and r["remat"] == "none"}
    for (sweep, impl, mode), r in main_rows.items():
        if impl == "jaxft":
            for other in ("torch", "torch_compile"):
                if (sweep, other, mode) in main_rows:
                    t = main_rows[sweep, other, mode]
                    print(f"{sweep + ' ' if sweep else ''}{mode}: jaxft/{other} tokens/s = "
                          f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x")
    for (sweep, impl, mode), lo in main_rows.items():
        if mode != "lora" or (sweep, impl, "full") not in main_rows:
            continue
        fu = main_rows[sweep, impl, "full"]
        own = [(r["peak_rss_mb"] - r["runtime_rss_mb"]) for r in (lo, fu)]
        line = (f"{impl}: LoRA/full peak RSS = {lo['peak_rss_mb'] / fu['peak_rss_mb']:.2f} "
                f"(above the runtime's own: {own[0]:.0f}/{own[1]:.0f} MB = "
                f"{own[0] / own[1]:.2f})")
        if "device_peak_mb" in lo and "device_peak_mb" in fu:
            line = (f"{impl}: LoRA/full peak GPU memory = "
                    f"{lo['device_peak_mb'] / fu['device_peak_mb']:.2f}")
        elif "xla_temp_mb" in lo:
            xla = [r["xla_argument_mb"] + r["xla_temp_mb"] for r in (lo, fu)]
            line += f"; XLA arguments+temporaries {xla[0]:.0f}/{xla[1]:.0f} MB = " \
                    f"{xla[0] / xla[1]:.2f}"
        print(line)
    depth = [r for r in ok if r["impl"] == "jaxft" and r["mode"] == "lora"
             and r["sweep"] in ("", "depth") and r["seq"] == a.seq]
    if len({r["layers"] for r in depth}) > 1:
        depth.sort(key=lambda r: r["layers"])
        print("jaxft compile time vs depth: " + ", ".join(
            f"L={r['layers']}: {r['compile_s']:.2f}s" for r in depth)
            + f"  (deepest/shallowest = {depth[-1]['compile_s'] / depth[0]['compile_s']:.2f}x)")
    for r in ok:
        if "profile" not in r:
            continue
        prof = r["profile"]
        print(f"profile, jaxft {r['sweep'] + ' ' if r['sweep'] else ''}{r['mode']}: "
              f"{prof['total_ms']:.0f} ms of op time per step "
              f"(ops on every thread or stream summed; step {r['step_s'] * 1e3:.0f} ms)")
        for label, part in (("by scope", prof["scopes"]), ("by kind", prof["kinds"])):
            print(f"  {label}: " + ", ".join(f"{k} {v:.0f}" for k, v in part.items()))
        for op in prof["top_ops"]:
            print(f"    {op['ms']:7.1f} ms  {op['op']:<34} {op['shape']:<24} {op['scope']}")
    print(f"benchmark wall time: {seconds:.0f}s; load average: {os.getloadavg()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxft
    main()
