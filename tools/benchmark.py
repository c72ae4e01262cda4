"""Fine-tuning throughput: jaxft against PyTorch+PEFT, side by side on this machine.

    python tools/benchmark.py                          # default shape, LoRA and full, ~3 min
    python tools/benchmark.py --quick                  # smoke run, seconds
    python tools/benchmark.py --scaling --json runs/benchmark.json   # + depth and length sweeps
    python tools/benchmark.py --profile                # + jaxft's top XLA ops per mode

Each (implementation, mode) runs in its own subprocess, so peak host memory (RSS) is its own and
neither library's thread pools or allocator see the other's. Both get the same random Llama
checkpoint (written once with transformers), the same batch, the same thread count (CPU affinity
plus torch.set_num_threads), and AdamW with global-norm clipping at 1.0. Tokens/s is the median
of the timed steps after warm-up. jaxft's compile time is `lower().compile()` of the whole step;
PyTorch runs eager, so it has none (its first step is reported instead).

MFU divides the model FLOPs of a step by the machine's measured peak matmul rate (the better of
a large float32 jnp and torch matmul, each measured in its own subprocess):
    full FT : 6·N·tokens + 12·L·T·D·tokens
    LoRA    : 4·N·tokens + 6·N_lora·tokens + 12·L·T·D·tokens
N counts the weights of every matmul (layers and output head, not the embedding lookup); the
frozen base of LoRA needs no weight gradients, hence 4 rather than 6. 12·L·T·D·tokens is dense
attention: QKᵀ and PV forward (2·2·T·D per token and layer), twice that backward.

On a GPU the same comparison runs in bfloat16 (jaxft: float32 master weights, bfloat16 compute;
PyTorch: float32 weights under autocast); that path is present but untested on CPU-only CI.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on GPU")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is (default: transparent huge pages for every "
                        "worker, GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")
    p.add_argument("--impls", default="jaxft,torch")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 timed step: a smoke run")
    p.add_argument("--scaling", action="store_true",
                   help="also LoRA at 4/8/16 layers and 128/256/512 tokens")
    p.add_argument("--profile", action="store_true", help="also jaxft's top XLA ops per mode")
    p.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # impl:mode, run inside a subprocess
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab = 64, 2, 128, 4, 256
        args.batch, args.seq, args.rank, args.steps, args.warmup = 2, 32, 4, 1, 1
    args.kv_heads = args.kv_heads or args.heads
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


SHAPE_FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq",
                "rank", "threads")


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def matmul_params(a) -> tuple[int, int]:
    """(N, N_lora): weights of every matmul in the model, and of the LoRA factors."""
    head = a.hidden // a.heads
    attn = a.hidden * head * (2 * a.heads + 2 * a.kv_heads)  # q, o, k, v
    mlp = 3 * a.hidden * a.intermediate
    n = a.layers * (attn + mlp) + a.hidden * a.vocab
    lora_in_out = [(a.hidden, a.heads * head), (a.hidden, a.kv_heads * head),
                   (a.hidden, a.kv_heads * head), (a.heads * head, a.hidden),
                   (a.hidden, a.intermediate), (a.hidden, a.intermediate),
                   (a.intermediate, a.hidden)]
    n_lora = a.layers * sum(a.rank * (i + o) for i, o in lora_in_out)
    return n, n_lora


def step_flops(a, mode: str) -> float:
    n, n_lora = matmul_params(a)
    tokens = a.batch * a.seq
    attention = 12 * a.layers * a.seq * a.hidden * tokens
    if mode == "full":
        return 6 * n * tokens + attention
    return 4 * n * tokens + 6 * n_lora * tokens + attention


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

    n = 4096 if jax.default_backend() == "cpu" else 8192
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(x, x).block_until_ready()
    t = min(timed(lambda: f(x, x).block_until_ready(), 5))
    return {"impl": "jax", "mode": "peak_matmul", "flops_per_s": 2 * n**3 / t,
            "matmul": f"{n}x{n} {jnp.dtype(dtype).name}"}


def peak_torch(a) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (4096, torch.float32)
    x = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x @ x
    sync()
    t = min(timed(lambda: (x @ x, sync()), 5))
    return {"impl": "torch", "mode": "peak_matmul", "flops_per_s": 2 * n**3 / t,
            "matmul": f"{n}x{n} {str(dtype).removeprefix('torch.')}"}


def run_jaxft(a, mode: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import jaxft
    from jaxft import config, lora, optim, train_step

    start_rss = rss_mb()
    gpu = jax.default_backend() != "cpu"
    compute = {"auto": "bfloat16" if gpu else "float32"}.get(a.dtype, a.dtype)
    model = jaxft.from_pretrained(a.checkpoint, dtype="float32", compute_dtype=compute)
    lora_cfg = None
    if mode == "lora":
        lora_cfg = lora.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=TARGETS)
        lora.apply_lora(model, lora_cfg)
    graphdef, trainable, dropout, frozen = nnx.split(model, lora.trainable_filter(lora_cfg),
                                                     lora.DropoutKey, ...)
    del model
    optim_cfg = config.base_config().optim
    optim_cfg.update(dict(lr=LR, schedule="constant", warmup_steps=0, clip_norm=1.0))
    tx, _ = optim.make_optimizer(optim_cfg, trainable, a.steps + a.warmup + 1)
    opt_state = jax.jit(tx.init)(trainable)
    batch = jax.device_put(make_batch(a))
    rng = jax.device_put(np.asarray(jax.random.PRNGKey(0)))
    step = jax.jit(train_step.make_train_step(graphdef, tx, task="lm"), donate_argnums=(0, 3))

    start = time.perf_counter()
    compiled = step.lower(trainable, frozen, dropout, opt_state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    row: dict = {"compile_s": compile_s, "dtype": compute}
    memory = compiled.memory_analysis()
    if memory is not None:  # bytes XLA plans for the step: arguments, outputs, temporaries
        row["xla_argument_mb"] = memory.argument_size_in_bytes / 2**20
        row["xla_output_mb"] = memory.output_size_in_bytes / 2**20
        row["xla_alias_mb"] = memory.alias_size_in_bytes / 2**20
        row["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
    cost = compiled.cost_analysis()
    if cost and "flops" in cost:
        row["xla_flops"] = float(cost["flops"])
    state = {"trainable": trainable, "opt_state": opt_state}

    def one_step():
        state["trainable"], state["opt_state"], metrics = compiled(
            state["trainable"], frozen, dropout, state["opt_state"], batch, rng)
        jax.block_until_ready((state["trainable"], metrics))
        state["loss"] = float(metrics["loss"])

    first = timed(one_step, 1)[0]
    timed(one_step, a.warmup)
    if a.profile:
        row["profile"] = profile_ops(one_step)
    times = timed(one_step, a.steps)
    row.update(first_step_s=first, step_times=times, loss=state["loss"],
               peak_rss_mb=peak_rss_mb(), runtime_rss_mb=start_rss)
    return row


def profile_ops(one_step, top: int = 15) -> list[dict]:
    """Self time per XLA op over two traced steps (`jax.profiler`): the thunks XLA's CPU runtime
    records, minus the time of ops nested inside them (a while loop's body)."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            one_step()
            one_step()
        (path,) = Path(logdir).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    totals: dict[str, float] = {}
    for plane in data.planes:
        for line in plane.lines:
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
    grand = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": name, "ms_per_step": ns / 2 / 1e6, "share": ns / grand}
            for name, ns in ranked]


def run_torch(a, mode: str) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers

    start_rss = rss_mb()
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    compute = {"auto": "bfloat16" if cuda else "float32"}.get(a.dtype, a.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.checkpoint, dtype=torch.float32, attn_implementation="sdpa").to(device)
    if mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=a.rank, lora_alpha=2.0 * a.rank, target_modules=list(TARGETS), lora_dropout=0.0))
    model.train()
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

    first = timed(one_step, 1)[0]
    timed(one_step, a.warmup)
    times = timed(one_step, a.steps)
    row = {"compile_s": None, "dtype": compute, "first_step_s": first, "step_times": times,
           "loss": state["loss"], "peak_rss_mb": peak_rss_mb(), "runtime_rss_mb": start_rss}
    if cuda:
        row["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def worker(a) -> dict:
    impl, mode = a.worker.split(":")
    if impl == "peak":
        return peak_jax(a) if mode == "jax" else peak_torch(a)
    row = (run_jaxft if impl == "jaxft" else run_torch)(a, mode)
    tokens = a.batch * a.seq
    median = statistics.median(row["step_times"])
    row.update(impl=impl, mode=mode, tokens_per_s=tokens / median, step_s=median,
               model_flops=step_flops(a, mode))
    row.update({f: getattr(a, f) for f in SHAPE_FIELDS})
    return row


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def write_checkpoint(a, directory: Path) -> None:
    """A random-init Llama, saved the way users' checkpoints are (both impls load it)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(a.seq, 128), tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def spawn(a, job: str, profile: bool = False, **overrides) -> dict:
    """Run one worker in a fresh interpreter pinned to `threads` CPUs; returns its row."""
    flags = {f: overrides.get(f, getattr(a, f)) for f in SHAPE_FIELDS}
    flags.update(steps=a.steps, warmup=a.warmup, dtype=a.dtype,
                 checkpoint=overrides.get("checkpoint", a.checkpoint))
    cmd = [sys.executable, __file__, "--worker", job]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
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
    proc = subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), *cmd], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return []
    begin = time.perf_counter()
    impls, modes = a.impls.split(","), a.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        peaks = [spawn(a, f"peak:{impl}", checkpoint=tmp) for impl in ("jax", "torch")]
        peak = max(p["flops_per_s"] for p in peaks)

        def sweep(label: str, **shape) -> None:
            b = argparse.Namespace(**{**vars(a), **shape})
            ckpt = Path(tmp) / f"L{b.layers}"
            if not ckpt.exists():
                write_checkpoint(b, ckpt)
            for mode in (modes if not label else ["lora"]):
                for impl in impls:
                    row = spawn(a, f"{impl}:{mode}", checkpoint=ckpt,
                                profile=a.profile and impl == "jaxft" and not label, **shape)
                    row["mfu"] = row["model_flops"] / row["step_s"] / peak
                    row["sweep"] = label
                    rows.append(row)
                    print(f"  {label or 'main':>7} {impl:>5} {mode:>4}: "
                          f"{row['tokens_per_s']:8.0f} tok/s", file=sys.stderr, flush=True)

        sweep("")
        if a.scaling:
            for layers in (4, 8, 16):
                if layers != a.layers:
                    sweep("depth", layers=layers)
            for seq in (128, 256, 512):
                if seq != a.seq:
                    sweep("length", seq=seq)
    report(a, rows, peaks, time.perf_counter() - begin)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(peaks + rows, indent=1))
    return peaks + rows


def report(a, rows: list[dict], peaks: list[dict], seconds: float) -> None:
    n, n_lora = matmul_params(a)
    print(f"\nLlama D={a.hidden} L={a.layers} F={a.intermediate} heads={a.heads}/{a.kv_heads} "
          f"V={a.vocab}; batch {a.batch}×{a.seq} tokens; LoRA rank {a.rank} on "
          f"{len(TARGETS)} projections; {a.threads} thread(s) per process; "
          f"N={n / 1e6:.2f}M matmul weights, N_lora={n_lora / 1e6:.2f}M")
    for p in peaks:
        print(f"peak matmul ({p['impl']}, {p['matmul']}): {p['flops_per_s'] / 1e9:.1f} GFLOP/s")
    print("MFU = model FLOPs / step time / best peak;  full: 6·N·tok + 12·L·T·D·tok,  "
          "LoRA: 4·N·tok + 6·N_lora·tok + 12·L·T·D·tok")
    head = (f"{'sweep':>6} {'impl':>5} {'mode':>4} {'L':>3} {'T':>4} {'tok/s':>8} {'step s':>7} "
            f"{'MFU':>5} {'compile s':>9} {'1st step s':>10} {'peak RSS MB':>11} "
            f"{'XLA arg+tmp MB':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        xla = (f"{r['xla_argument_mb'] + r['xla_temp_mb']:.0f}" if "xla_temp_mb" in r else "-")
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        print(f"{r['sweep'] or 'main':>6} {r['impl']:>5} {r['mode']:>4} {r['layers']:>3} "
              f"{r['seq']:>4} {r['tokens_per_s']:>8.0f} {r['step_s']:>7.3f} {r['mfu']:>5.0%} "
              f"{compile_s:>9} {r['first_step_s']:>10.2f} {r['peak_rss_mb']:>11.0f} {xla:>14}")
    main_rows = {(r["impl"], r["mode"]): r for r in rows if not r["sweep"]}
    for mode in ("lora", "full"):
        if ("jaxft", mode) in main_rows and ("torch", mode) in main_rows:
            j, t = main_rows["jaxft", mode], main_rows["torch", mode]
            print(f"{mode}: jaxft/torch tokens/s = {j['tokens_per_s'] / t['tokens_per_s']:.2f}x")
    for impl in ("jaxft", "torch"):
        if (impl, "lora") in main_rows and (impl, "full") in main_rows:
            lo, fu = main_rows[impl, "lora"], main_rows[impl, "full"]
            own = [(r["peak_rss_mb"] - r["runtime_rss_mb"]) for r in (lo, fu)]
            line = (f"{impl}: LoRA/full peak RSS = {lo['peak_rss_mb'] / fu['peak_rss_mb']:.2f} "
                    f"(above the runtime's own: {own[0]:.0f}/{own[1]:.0f} MB = "
                    f"{own[0] / own[1]:.2f})")
            if "xla_temp_mb" in lo:
                xla = [r["xla_argument_mb"] + r["xla_temp_mb"] for r in (lo, fu)]
                line += f"; XLA arguments+temporaries {xla[0]:.0f}/{xla[1]:.0f} MB = " \
                        f"{xla[0] / xla[1]:.2f}"
            print(line)
    depth = [r for r in rows if r["impl"] == "jaxft" and r["mode"] == "lora"
             and r["seq"] == a.seq and r["compile_s"]]
    if len({r["layers"] for r in depth}) > 1:
        depth.sort(key=lambda r: r["layers"])
        print("jaxft compile time vs depth: " + ", ".join(
            f"L={r['layers']}: {r['compile_s']:.2f}s" for r in depth)
            + f"  (deepest/shallowest = {depth[-1]['compile_s'] / depth[0]['compile_s']:.2f}x)")
    for r in rows:
        for op in r.get("profile", []):
            print(f"  profile jaxft {r['mode']:>4}: {op['ms_per_step']:8.1f} ms "
                  f"{op['share']:5.1%}  {op['op']}")
    print(f"benchmark wall time: {seconds:.0f}s; load average: {os.getloadavg()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxft
    main()
