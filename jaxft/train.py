r"""Fine-tune a Hugging Face model, full or LoRA, on one device or a mesh of many.

  python -m jaxft.train --config=configs/lora.py [--config.lora.rank=16 ...]

Read top to bottom: config → mesh → data → model → shard → step → checkpoint → loop. Starting
again with the same workdir resumes from its latest checkpoint. SIGTERM (preemption) saves a
checkpoint at the next step boundary and exits 0. Multi-host: run the same command on every
host (see `maybe_initialize_distributed` for the environment it reads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from jaxft import checkpoint, data, hf_io, lora, optim, sharding, train_step
from jaxft import config as config_lib
from jaxft.errors import JaxftError
from jaxft.metrics import MetricsWriter
from jaxft.models import layers

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
# --- dry run (jaxft.plan) ---
flags.DEFINE_bool("dry_run", False, "Print per-device memory, FLOPs and trainable parameters of "
                  "the configured step from the model's config alone, then exit: no weights are "
                  "read, nothing is allocated.")
# --- end dry run ---
FLAGS = flags.FLAGS


class Preemption:
    """Turns SIGTERM into "save at the next step boundary, then exit 0"."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, step: int) -> bool:
        """True on every host once any host was asked to stop."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags_ = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags_)) or multihost_utils.reached_preemption_sync_point(step)


def maybe_initialize_distributed() -> None:
    """Join a multi-process run when the environment describes one.

    TPU pods and Slurm are detected by `jax.distributed.initialize()` itself (set
    JAXFT_DISTRIBUTED=1); elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        # CPU processes exchange collectives over gloo; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAXFT_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def run(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train as the config says; returns the final metrics (also written to the workdir)."""
    # ----------------------------------------------------------------------------------------
    # Config
    # ----------------------------------------------------------------------------------------
    maybe_initialize_distributed()
    config_lib.validate(cfg, jax.device_count())
    workdir = Path(cfg.workdir)
    is_main = jax.process_index() == 0
    if cfg.checkpoint.resume == "fresh" and is_main and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lora_cfg = config_lib.lora_config(cfg)

    # ----------------------------------------------------------------------------------------
    # Mesh
    # ----------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(),
                 jax.default_backend())

    # ----------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------
    model_path = str(hf_io.resolve(cfg.model.path))
    tokenizer = data.load_tokenizer(model_path)
    bundle = data.build_data(cfg.data, tokenizer, global_batch_size=cfg.train.batch_size,
                             task=cfg.task)
    print(f"data: {bundle.format}, {_describe_stats(bundle.stats)}")
    num_labels = None
    if cfg.task == "classification":
        num_labels = cfg.model.num_labels or len(bundle.label_map)
        if is_main:
            bundle.save_label_map(workdir / "label_map.json")

    # ----------------------------------------------------------------------------------------
    # Model
    # ----------------------------------------------------------------------------------------
    model = hf_io.from_pretrained(model_path, dtype=cfg.train.param_dtype,
                                  compute_dtype=config_lib.compute_dtype(cfg),
                                  num_labels=num_labels, seed=cfg.train.seed,
                                  remat=cfg.train.remat, attention=cfg.model.attention, mesh=mesh)
    if lora_cfg is not None:
        lora.apply_lora(model, lora_cfg, seed=cfg.train.seed)
    lora.log_trainable(model, lora_cfg)
    if is_main:
        _write_resolved_config(cfg, workdir, model, model_path, num_labels)

    # ----------------------------------------------------------------------------------------
    # Shard: trainable / dropout keys / frozen, each on its own shardings
    # ----------------------------------------------------------------------------------------
    model.train()  # dropout on, at the checkpoint's rates (and LoRA's)
    graphdef, trainable, dropout, frozen = nnx.split(
        model, lora.trainable_filter(lora_cfg), layers.DropoutKey, ...)
    model.eval()
    eval_graphdef = nnx.split(model, lora.trainable_filter(lora_cfg), layers.DropoutKey, ...)[0]
    del model
    shard = {name: sharding.state_shardings(s, mesh)
             for name, s in (("trainable", trainable), ("dropout", dropout), ("frozen", frozen))}
    trainable = sharding.put_state(trainable, shard["trainable"])
    dropout = sharding.put_state(dropout, shard["dropout"])
    frozen = sharding.put_state(frozen, shard["frozen"])
    tx, schedule = optim.make_optimizer(cfg.optim, trainable, cfg.train.steps,
                                        state_dtype=cfg.train.optimizer_state_dtype)
    replicated = sharding.replicated(mesh)
    opt_sharding = sharding.optimizer_shardings(tx, trainable, shard["trainable"], mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(trainable)
    batch_sharding = sharding.batch_sharding(mesh)

    # ----------------------------------------------------------------------------------------
    # Steps
    # ----------------------------------------------------------------------------------------
    step_fn = train_step.make_train_step(graphdef, tx, task=cfg.task,
                                         accum_steps=cfg.train.accum_steps,
                                         skip_nonfinite=cfg.train.on_nonfinite == "skip")
    train_jit = jax.jit(
        step_fn,
        in_shardings=(shard["trainable"], shard["frozen"], shard["dropout"], opt_sharding,
                      None, replicated),
        out_shardings=(shard["trainable"], opt_sharding, replicated),
        donate_argnums=(0, 3))
    eval_jit = jax.jit(train_step.make_eval_step(eval_graphdef, task=cfg.task),
                       in_shardings=(shard["trainable"], shard["frozen"], shard["dropout"], None),
                       out_shardings=replicated)

    def global_batch(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return data.to_global_arrays(local, batch_sharding)  # 1-D arrays: rows sharded alike

    def evaluate() -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, local in enumerate(bundle.eval_batches()):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            out = jax.device_get(eval_jit(trainable, frozen, dropout, global_batch(local)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if not sums.get("count"):
            return {}
        result = {"eval_loss": sums["loss_sum"] / sums["count"]}
        if cfg.task == "lm":
            result["eval_perplexity"] = math.exp(min(result["eval_loss"], 50.0))
        if "correct" in sums:
            result["eval_accuracy"] = sums["correct"] / sums["count"]
        return result

    def samples() -> dict[str, Any]:
        """Greedy completions of `train.sample_prompts`, to read what the model has learned."""
        if not cfg.train.sample_prompts or cfg.task != "lm":
            return {}  # (every process runs the generation: the weights are sharded over all)
        from jaxft import generate

        model = nnx.merge(eval_graphdef, trainable, frozen, dropout)
        prompts = list(cfg.train.sample_prompts)
        texts = generate.generate(model, tokenizer, prompts,
                                  max_new_tokens=cfg.train.sample_tokens,
                                  chat=tokenizer.chat_template is not None)
        for prompt, text in zip(prompts, texts, strict=True):
            if is_main:
                print(f"  sample: {prompt!r} -> {text!r}")
        return {"samples": [{"prompt": p, "completion": t}
                            for p, t in zip(prompts, texts, strict=True)]}

    # ----------------------------------------------------------------------------------------
    # Checkpoint: resume if the workdir has one
    # ----------------------------------------------------------------------------------------
    # Step keys are fold_in(seed key, step): a pure function of the step, so a resumed run
    # draws exactly the keys an uninterrupted one would, with no RNG state to checkpoint.
    base_key = jax.random.PRNGKey(cfg.train.seed)
    ckpts = checkpoint.Checkpoints(
        workdir / "checkpoints", keep=cfg.checkpoint.keep,
        fingerprint=_fingerprint(cfg, model_path, trainable))
    start_step, skipped = 0, 0
    history: dict[str, Any] = {}
    state = {"trainable": trainable, "opt_state": opt_state}
    if cfg.checkpoint.resume == "never" and ckpts.steps():
        raise JaxftError(f"{ckpts.directory}: holds checkpoints {ckpts.steps()} and "
                         "checkpoint.resume is 'never'")
    restored = ckpts.restore_latest(checkpoint.abstract_like(state))
    if restored is not None:
        start_step, state, meta = restored
        bundle.train.set_state(meta["data"])
        skipped, history = meta.get("skipped_steps", 0), meta.get("history", {})
        print(f"resumed from {ckpts.directory / str(start_step)} at step {start_step}")
    trainable, opt_state = state["trainable"], state["opt_state"]

    def save(step: int) -> None:
        ckpts.save(step, {"trainable": trainable, "opt_state": opt_state},
                   {"data": bundle.train.get_state(), "skipped_steps": skipped,
                    "history": history})

    # ----------------------------------------------------------------------------------------
    # Loop
    # ----------------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main)
    if start_step == 0:
        base = evaluate()
        if base:
            history["base_eval_loss"] = base["eval_loss"]
            print(f"step 0 (base model): {_describe(base)}")
        writer.write(0, {**base, **samples()})
    preemption = Preemption()
    progress = writer.progress(cfg.train.steps, start_step)
    tokens_seen, window_start, last = 0.0, time.perf_counter(), {}
    step = start_step
    while step < cfg.train.steps:
        local = next(bundle.train)
        if step + 1 == cfg.train.corrupt_batch_at:
            local = _corrupted(local)
        step_rng = np.asarray(jax.random.fold_in(base_key, step))
        trainable, opt_state, metrics = train_jit(trainable, frozen, dropout, opt_state,
                                                  global_batch(local), step_rng)
        step += 1
        if not bool(metrics["finite"]):
            if cfg.train.on_nonfinite == "stop":
                ckpts.wait()
                raise JaxftError(f"step {step}: loss or gradient is not finite; stopped without "
                                 f"saving (last checkpoint: {ckpts.steps()[-1:] or 'none'})")
            skipped += 1
            logging.warning("step %d: non-finite loss or gradient, update skipped (%d so far)",
                            step, skipped)
        tokens_seen += cfg.train.batch_size * bundle.seq_len  # processed, padding included
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            last = {"train_loss": float(metrics["loss"]), "lr": float(schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "skipped_steps": skipped}
            if "accuracy" in metrics:
                last["train_accuracy"] = float(metrics["accuracy"])
            writer.write(step, last)
            tokens_seen, window_start = 0.0, time.perf_counter()
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0
                and step != cfg.train.steps):
            writer.write(step, {**evaluate(), **samples()})
        progress.update(step, last)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save(step)
        if preemption.agreed(step):
            save(step)
            ckpts.close()
            print(f"preempted: saved step {step} to {ckpts.directory}; rerun to resume")
            writer.close()
            return {"step": step, "preempted": True}

    final = {"step": step, **last, **evaluate()}
    if "base_eval_loss" in history:
        final["base_eval_loss"] = history["base_eval_loss"]
    writer.write(step, {**{k: v for k, v in final.items() if k.startswith("eval_")},
                        **samples()})
    if not ckpts.steps() or ckpts.steps()[-1] != step:
        save(step)
    ckpts.close()
    progress.close()
    writer.close()
    if is_main:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        _write_plot(workdir)  # --- plot (jaxft.plot) ---
    print(f"done: step {step}: {_describe(final)}; checkpoints in {ckpts.directory}")
    return final


# --- plot (jaxft.plot) ---
def _write_plot(workdir: Path) -> None:
    """metrics.png beside metrics.jsonl; a plot must never fail a run that trained."""
    try:
        from jaxft.plot import plot_metrics

        print(f"plot: {plot_metrics(workdir)}")
    except Exception as e:  # matplotlib missing, a metrics file edited by hand: log, carry on
        logging.warning("no plot for %s: %s: %s", workdir, type(e).__name__, e)
# --- end plot ---


def _corrupted(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch whose loss is NaN, to rehearse the non-finite-step handling."""
    weight = "loss_mask" if "loss_mask" in local else "valid"
    if weight not in local:
        local = {**local, "valid": np.ones(len(local["labels"]), np.float32)}
    return {**local, weight: np.full_like(local[weight], np.nan, dtype=np.float32)}


def _fingerprint(cfg, model_path: str, trainable: nnx.State) -> dict[str, Any]:
    shapes = [list(x.shape) for x in jax.tree.leaves(trainable)]
    fingerprint = {
        "model": model_path,
        "task": cfg.task,
        "lora": cfg.lora.to_dict() if cfg.lora.enabled else None,
        "param_dtype": cfg.train.param_dtype,
        "optimizer_state_dtype": cfg.train.optimizer_state_dtype,
        "trainable_shapes": shapes,
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back from the checkpoint


def _write_resolved_config(cfg, workdir: Path, model, model_path: str, num_labels) -> None:
    resolved = cfg.to_dict()
    resolved["model"]["resolved_path"] = model_path
    resolved["model"]["hf_config"] = model.config.to_hf()
    if num_labels:
        resolved["model"]["num_labels"] = num_labels
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def _describe(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


def _describe_stats(stats: dict[str, Any]) -> str:
    keys = ("train_examples", "eval_examples", "rows_per_epoch", "packing_efficiency",
            "truncated", "dropped")
    return ", ".join(f"{k} {stats[k]}" for k in keys if k in stats)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/<recipe>.py is required")
    if not FLAGS["verbosity"].present:  # Orbax and XLA log every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        if FLAGS.dry_run:  # --- dry run (jaxft.plan): compile abstractly, read no weights ---
            from jaxft import plan

            plan.print_plan(FLAGS.config)
            return
        run(FLAGS.config)
    except JaxftError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
