r"""Fine-tune a Hugging Face model, full or LoRA, on one device or a mesh of many.

  python -m jaxft.train --config=configs/lora.py [--config.lora.rank=16 ...]

Read top to bottom: config → workdir → mesh → data → model → step → checkpoint → loop.
Starting again with the same workdir resumes from its latest checkpoint; nothing is written to
the workdir until the run is known to be compatible with what is already there. SIGTERM
(preemption) and Ctrl-C, from the moment the run starts, save a checkpoint at the next step
boundary (or stop before training when they arrive during loading) and say how to resume; a
preempted run exits 0, an interrupted one 130, and a second Ctrl-C aborts at once. Multi-host:
run the same command on every host (see `maybe_initialize_distributed` for the environment it
reads).

Between log, eval and checkpoint steps the loop never waits on the devices: the step keeps its
own running sums, and those steps run under a transfer guard that refuses any device-to-host
copy, so a regression fails loudly instead of silently serialising host and device.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from jaxft import checkpoint, cli, data, lora, progress, sharding, spec, tasks, train_step
from jaxft import evaluate as evaluation_lib
from jaxft.data import prompts
from jaxft.early_stopping import BEST_DIRECTORY, EarlyStopping
from jaxft.errors import JaxftError
from jaxft.hf import weights
from jaxft.metrics import LogWindow, MetricsWriter
from jaxft.preemption import INTERRUPTED_EXIT_CODE, Preemption
from jaxft.wandb_log import WandbRun, requested
from jaxft.workdir import LABEL_MAP, claim_workdir, prepare_workdir, wipe_workdir

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
# --- dry run (jaxft.plan) ---
flags.DEFINE_bool("dry_run", False, "Print per-device memory, FLOPs and trainable parameters of "
                  "the configured step from the model's config alone, then exit: no weights are "
                  "read, nothing is allocated.")
flags.DEFINE_string("topology", None, "With --dry_run: compile for this TPU slice or these "
                    "GPUs instead of this machine: v5e-8, v4-8, v5p-8, v6e-8, other standard "
                    "sizes or a raw 'v5e:2x4' (needs libtpu: the `tpu` extra); h100, h100x8, "
                    "a100-80, l4, rtx4090, rtx4060-laptop, … or a card's .txtpb (needs JAX's "
                    "CUDA plugin: the `gpu-plan` extra). No accelerator needed.")
flags.DEFINE_bool("suggest", False, "With --dry_run: compile candidate remat policies, "
                  "micro-batch counts and mesh layouts and print the fastest that fits, as a "
                  "command line.")
# --- end dry run ---
FLAGS = flags.FLAGS
# What the steps between two host reads may copy from the devices: nothing, not even
# explicitly (jax.device_get), so any per-step sync is an error rather than a slowdown.
STEP_TRANSFERS = "disallow_explicit"


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
    """Train as the config says; returns the final metrics (also written to the workdir).

    Device-to-host copies are allowed where the run needs them (loading, log, eval and
    checkpoint steps) whatever the caller's JAX transfer guard says, and refused in between.
    """
    with (Preemption() as preemption, jax.transfer_guard_device_to_host("allow"),
          contextlib.ExitStack() as cleanup):
        return _run(cfg, preemption, cleanup)


def _run(cfg: ml_collections.ConfigDict, preemption: Preemption,
         cleanup: contextlib.ExitStack) -> dict[str, Any]:
    # ----------------------------------------------------------------------------------------
    # Config and workdir: refused in one line before anything loads; nothing written yet
    # ----------------------------------------------------------------------------------------
    maybe_initialize_distributed()
    run_spec = spec.resolve(cfg)
    workdir = Path(cfg.workdir)
    prepare_workdir(workdir)
    if cfg.checkpoint.resume == "fresh":
        wipe_workdir(workdir)
    if not workdir.exists() or not any(workdir.iterdir()):
        claim_workdir(workdir)  # a new workdir is this run's from the start
    is_main = jax.process_index() == 0

    # ----------------------------------------------------------------------------------------
    # Mesh
    # ----------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                              expert=cfg.mesh.expert)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(),
                 jax.default_backend())

    # ----------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------
    model_path, tokenizer_path = spec.model_paths(cfg)
    tokenizer = data.load_tokenizer(tokenizer_path)
    if run_spec.task == tasks.GRPO:  # prompts: the rows are sampled in the loop
        bundle = prompts.build_prompts(cfg.data, global_batch_size=cfg.train.batch_size,
                                       num_generations=run_spec.grpo.num_generations,
                                       seed=cfg.data.seed)
        if bundle.conversational:  # sample prompts are then chats too
            if not getattr(tokenizer, "chat_template", None):
                raise JaxftError(f"{bundle.prompts.origin}: the prompts are conversations, "
                                 f"and the tokenizer of {tokenizer_path} has no chat template "
                                 "to render them with")
            bundle.chat_template = tokenizer.chat_template
    else:
        bundle = data.build_data(cfg.data, tokenizer, global_batch_size=cfg.train.batch_size,
                                 task=cfg.task)
    print(f"data: {bundle.describe()}")
    for note in bundle.notes:
        print(f"data: {note}")
    streamed = getattr(bundle, "streamed", None)  # (GRPO's prompts are never streamed)
    if streamed is not None:
        cleanup.callback(streamed.close)
    if streamed is not None and not cfg.train.epochs:  # its size: once tokenized
        print(f"train: {cfg.train.steps:,} steps of {cfg.train.batch_size} rows of "
              f"{bundle.seq_len} tokens, streamed while the corpus is tokenized")
    else:
        if streamed is not None:
            print("train: train.epochs needs the streamed corpus's size: waiting for "
                  f"{streamed.to_tokenize} shards to be tokenized")
        rows = (bundle.train.rows_per_epoch() if streamed is not None
                else bundle.stats["rows_per_epoch"])
        if cfg.train.epochs:  # steps from epochs, before anything reads train.steps
            cfg.train.steps = max(1, math.ceil(cfg.train.epochs * rows / cfg.train.batch_size))
        print(f"train: {cfg.train.steps:,} steps of {cfg.train.batch_size} rows = "
              f"{cfg.train.steps * cfg.train.batch_size / rows:.2f} epochs of the {rows:,} "
              "train rows")
    num_labels = None
    if run_spec.task == tasks.CLASSIFICATION:
        num_labels = cfg.model.num_labels or len(bundle.label_map)

    # ----------------------------------------------------------------------------------------
    # Model and step: split, sharded, jitted (train_step.build, as the dry run compiles it)
    # ----------------------------------------------------------------------------------------
    model = weights.load_hf_model(model_path, run_spec.model_options(num_labels), mesh=mesh)
    if run_spec.lora is not None:
        lora.apply_lora(model, run_spec.lora, seed=cfg.train.seed)
    lora.log_trainable(model, run_spec.lora)
    hf_config = model.config.to_hf()
    step, states = train_step.build(model, run_spec, mesh)
    del model
    placed = step.place(states)
    trainable, frozen, dropout, opt_state = (placed[k] for k in ("trainable", "frozen",
                                                                  "dropout", "opt_state"))
    batch_sharding = sharding.batch_sharding(mesh)

    def global_batch(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return data.to_global_arrays(local, batch_sharding)  # 1-D arrays: rows sharded alike

    # DPO's reference, when it is not LoRA's base in the step: the initial weights, either
    # scored once here or kept as a frozen copy that scores each batch (before any restore)
    if run_spec.reference == spec.PRECOMPUTED:
        _score_reference(step, placed, bundle, global_batch)
    if run_spec.reference == spec.FROZEN_COPY:
        initial = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                          out_shardings=step.shardings["trainable"])(trainable)
        global_batch = evaluation_lib.with_reference(step, initial, frozen, dropout,
                                                     global_batch)

    rollouts = None
    if run_spec.task == tasks.GRPO:
        rollouts = _rollouts(step, run_spec, tokenizer, hf_config)

    def next_batch(n: int) -> dict[str, jax.Array]:
        """Step n's batch: the data's next, or (GRPO) the policy's completions of the next
        prompts, scored, their metrics folded into the log window; with num_iterations > 1,
        the same completions for that many steps, scored once by the policy that drew them."""
        nonlocal pending
        if rollouts is None:
            return global_batch(next(bundle.train))
        if n % iterations and pending is not None:
            return pending
        rows, found, shown = rollouts.batch((trainable, frozen, dropout),
                                            *bundle.next_prompts(), n)
        logged.add_host(found)
        last_completions[:] = shown[:4]
        pending = global_batch(_local_rows(rows))
        if step.old_logps is not None:
            pending["old_logps"] = step.old_logps(trainable, frozen, dropout, pending)
        return pending

    last_completions: list[dict[str, Any]] = []

    def evaluate() -> dict[str, float]:
        """`jaxft.evaluate`'s evaluation of the weights as they are: `eval_<metric>`s ({}
        without eval data); GRPO's: the held-out prompts' greedy completions, scored."""
        if rollouts is not None:
            if bundle.eval is None:
                return {}
            return {f"eval_{k}": v for k, v in rollouts.evaluate(
                (trainable, frozen, dropout), bundle.eval, cfg.train.eval_batches).items()}
        batches = itertools.islice(bundle.eval_batches(), cfg.train.eval_batches or None)
        sums = evaluation_lib.evaluate_batches(step, (trainable, frozen, dropout), batches,
                                               global_batch)
        if not sums["count"]:
            return {}
        return {f"eval_{k}": v for k, v in evaluation_lib.metrics(sums, run_spec.task).items()
                if k != "count"}

    # prompts go through a chat template only when the data did (conversations), and the same
    if bundle.chat_template is not None:
        tokenizer.chat_template = bundle.chat_template

    def samples() -> dict[str, Any]:
        """Greedy completions of `train.sample_prompts`, to read what the model has learned."""
        if not cfg.train.sample_prompts or not run_spec.causal:
            return {}  # (every process runs the generation: the weights are sharded over all)
        from jaxft import generate

        prompts = list(cfg.train.sample_prompts)
        texts = generate.generate(nnx.merge(step.eval_graphdef, trainable, frozen, dropout),
                                  tokenizer, prompts, max_new_tokens=cfg.train.sample_tokens,
                                  chat=bundle.chat_template is not None)
        for prompt, text in zip(prompts, texts, strict=True):
            writer.say(f"  sample: {prompt!r} -> {text!r}")
        return {"samples": [{"prompt": p, "completion": t}
                            for p, t in zip(prompts, texts, strict=True)]}

    # ----------------------------------------------------------------------------------------
    # Checkpoint: resume if the workdir has one (an incompatible one is refused right here)
    # ----------------------------------------------------------------------------------------
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                   fingerprint=checkpoint.fingerprint(run_spec, model_path,
                                                                      placed))
    start_step, skipped = 0, 0
    history: dict[str, Any] = {}
    if cfg.checkpoint.resume == "never" and ckpts.steps():
        raise JaxftError(f"{ckpts.directory}: holds checkpoints {ckpts.steps()} and "
                         "checkpoint.resume is 'never'")
    # GRPO over several iterations: a checkpoint between two draws keeps the batch of
    # completions the steps after it still train on
    iterations = run_spec.grpo.num_iterations if run_spec.grpo else 1
    kept = {}
    if iterations > 1:  # the batch as the step takes it: what the dry run compiles it for
        from jaxft.plan.dry_run import abstract_batch

        kept = {"rollout": abstract_batch(run_spec, mesh)}
    restored = ckpts.restore_latest(checkpoint.abstract_like(
        {"trainable": trainable, "opt_state": opt_state}) | kept)
    pending: dict[str, Any] | None = None  # the completions this cycle of iterations trains on
    if restored is not None:
        start_step, state, meta = restored
        trainable, opt_state = state["trainable"], state["opt_state"]
        pending = state.get("rollout")
        bundle.train.set_state(meta["data"])
        skipped, history = meta.get("skipped_steps", 0), meta.get("history", {})
        print(f"resumed from {ckpts.directory / str(start_step)} at step {start_step}")
    stopper = EarlyStopping.from_config(cfg, history.get("early_stopping"))
    best = None if stopper is None else checkpoint.Checkpoints(
        workdir / BEST_DIRECTORY, keep=1, fingerprint=ckpts.fingerprint)
    # The run is compatible with the workdir: from here on it is ours to write.
    claim_workdir(workdir)
    if is_main:
        _write_resolved_config(cfg, workdir, hf_config, model_path, tokenizer_path, num_labels)
        if run_spec.task == tasks.CLASSIFICATION:
            bundle.save_label_map(workdir / LABEL_MAP)

    def save(at: int) -> None:
        if stopper is not None:
            history["early_stopping"] = stopper.state()
        ckpts.save(at, {"trainable": trainable, "opt_state": opt_state,
                        **({"rollout": pending} if iterations > 1 else {})},
                   {"data": bundle.train.get_state(), "skipped_steps": skipped,
                    "history": history})

    def judge(at: int, metrics: dict[str, float]) -> None:
        """Early stopping's verdict on an eval; the best one's trained weights are kept."""
        if stopper is not None and stopper.update(at, metrics):
            best.replace(at, {"trainable": trainable}, {stopper.metric: stopper.best_value})

    # ----------------------------------------------------------------------------------------
    # Loop: host reads only at log, eval and checkpoint steps (and the last)
    # ----------------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main, resumed_at=start_step,
                           wandb=WandbRun(cfg, workdir) if is_main and requested(cfg) else None)
    total = cfg.train.steps
    every = {"log": cfg.train.log_every, "eval": cfg.train.eval_every,
             "save": cfg.checkpoint.every}

    tokens_per_step = cfg.train.batch_size * bundle.seq_len * bundle.sequences_per_row

    def due(kind: str, n: int) -> bool:
        return bool(every[kind]) and n % every[kind] == 0

    def new_window() -> LogWindow:
        return LogWindow(run_spec.task, step.window_sums)

    def log_line(at: int, window: LogWindow, skipped: int, bar: Any) -> dict[str, Any]:
        """A metrics line for the steps of `window`, written and shown on the bar (or, with no
        bar drawn, printed as a line: logs and pipes see every log step)."""
        line = {**window.metrics(), "lr": learning_rate(at - 1), "skipped_steps": skipped}
        if streamed is not None and streamed.to_tokenize:  # a corpus still being tokenized
            line["shards_to_tokenize"] = streamed.to_tokenize
        writer.write(at, line)
        bar.update(at, line)
        if not progress.shown():
            writer.say(f"step {at}/{total}: {_describe(line)}")
        return line

    def learning_rate(index: int) -> float:
        return float(jax.device_get(step.schedule(index)))

    def evaluate_and_sample(at: int) -> dict[str, float]:
        """The eval at step `at`: its metrics printed and written with the samples; the time it
        takes is left out of the tokens/s of the window it falls in."""
        with logged.paused():
            evaluated = evaluate()
            if evaluated:
                writer.say(f"step {at} eval: {_describe(evaluated)}")
            writer.write(at, {**evaluated, **samples()})
        return evaluated

    try:
        if stopper is not None and stopper.should_stop:  # a rerun of a run that stopped early
            print(f"this run stopped early at step {stopper.stopped_at}: "
                  f"{stopper.summary()['stopped']}; nothing to resume")
            done = workdir / "final_metrics.json"  # absent only if it died writing it
            return json.loads(done.read_text()) if done.is_file() else {
                "step": stopper.stopped_at, **stopper.summary()}
        if preemption.agreed():  # a stop while loading or compiling: nothing new to save
            how = "stopped (Ctrl-C)" if preemption.interrupted else "preempted"
            print(f"{how} before training resumed at step {start_step}; rerun to go on")
            return {"step": start_step, "preempted": True,
                    "interrupted": preemption.interrupted}
        if start_step == 0:
            base = evaluate()
            if base:
                watched = "eval_reward" if rollouts is not None else "eval_loss"
                history[f"base_{watched}"] = base[watched]
                print(f"step 0 (base model): {_describe(base)}")
            # the schedule's first value, so a plot of the learning rate starts at its warmup
            writer.write(0, {**base, "lr": learning_rate(0), **samples()})
        training_bar = writer.progress(total, start_step)
        window = step.zero_window()
        logged = new_window()
        last: dict[str, Any] = {}
        n = start_step
        while n < total:
            reading = n + 1 == total or any(due(kind, n + 1) for kind in every)
            # (a GRPO step reads its completions back, to score them)
            guard = "allow" if reading or rollouts is not None else STEP_TRANSFERS
            with jax.transfer_guard_device_to_host(guard):
                trainable, opt_state, window = step.train(
                    trainable, frozen, dropout, opt_state, window, next_batch(n),
                    train_step.step_number(n))
                n += 1
                # padding included
                logged.tokens += tokens_per_step
                training_bar.update(n, last)
                stop = preemption.at_step(n, reading)
            if not (reading or stop):
                continue
            # -- the host reads: the window's sums, then log / eval / save --
            bad = logged.add(jax.device_get(window))
            window = step.zero_window()
            skipped += bad
            if bad and cfg.train.on_nonfinite == "stop":
                ckpts.close()
                raise JaxftError(f"step {logged.first_nonfinite}: loss or gradient is not finite; "
                                 f"stopped without saving (last checkpoint: "
                                 f"{ckpts.steps()[-1:] or 'none'})")
            if bad:
                logging.warning("steps to %d: %d non-finite updates skipped, the first at step %d "
                                "(%d so far)", n, bad, logged.first_nonfinite, skipped)
            if due("log", n) or n == total:
                last, logged = log_line(n, logged, skipped, training_bar), new_window()
                if last_completions:  # what the policy wrote at this step, with its reward
                    writer.write(n, {"completions": list(last_completions)})
            if due("eval", n) and n != total:
                evaluated = evaluate_and_sample(n)
                judge(n, evaluated)
                if stopper is not None and stopper.should_stop:
                    if logged.sums["count"]:  # the steps since the last line, logged at the stop
                        last = log_line(n, logged, skipped, training_bar)
                    final_eval = evaluated
                    break
            if (due("save", n) and n != total) or stop:  # the last step saves after its eval
                with logged.paused():
                    save(n)
            if stop:
                ckpts.close()
                writer.close()
                print(preemption.stopped(n, ckpts.directory))
                return {"step": n, "preempted": True, "interrupted": preemption.interrupted}

        else:  # the loop ran to train.steps: the final eval
            final_eval = evaluate_and_sample(n)
            judge(n, final_eval)
        final = {"step": n, **last, **final_eval}
        for key in ("base_eval_loss", "base_eval_reward"):
            if key in history:
                final[key] = history[key]
        if stopper is not None:
            final.update(stopper.summary())
        writer.finish(final)
        if not ckpts.steps() or ckpts.steps()[-1] != n:
            save(n)
        ckpts.close()
        if best is not None:
            best.close()
    finally:  # the bar closes before any error or final line is printed, so those come last
        writer.close()
    if is_main:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        _write_plot(workdir)  # --- plot (jaxft.plot) ---
    print(f"done: step {n}: {_describe({k: v for k, v in final.items() if k != 'step'})}; "
          f"checkpoints in {ckpts.directory}")
    return final


def _rollouts(step: train_step.Step, run: spec.RunSpec, tokenizer, hf_config: dict):
    """GRPO's sampler and scorer over the step's own weights (`jaxft.rollout`)."""
    from jaxft import generate, rewards, rollout

    g, cfg = run.grpo, run.config
    eos_ids = tuple(generate.eos_ids(tokenizer, hf_config))
    if not eos_ids:
        raise JaxftError("task 'grpo' needs an end-of-sequence token to end completions: "
                         "neither the tokenizer nor the model's config.json names one")
    return rollout.Rollouts(
        step.eval_graphdef, step.shardings, step.mesh, tokenizer, g,
        rewards.resolve(cfg.grpo.reward_funcs, cfg.grpo.reward_weights),
        prompt_width=cfg.data.max_len - g.max_completion_length,
        rows_at_once=cfg.grpo.rollout_batch_size or cfg.train.batch_size,
        seed=cfg.train.seed, eos_ids=eos_ids)


def _local_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of a batch every process built whole (GRPO's, from the same
    prompts and the same gathered completions)."""
    count, index = jax.process_count(), jax.process_index()
    share = len(next(iter(rows.values()))) // count
    return {k: v[index * share:(index + 1) * share] for k, v in rows.items()}


def _score_reference(step: train_step.Step, placed: dict[str, Any], bundle: data.DataBundle,
                     global_batch) -> None:
    """Score every train and eval pair with the reference model (the weights as loaded, with
    any adapters off) and attach the scores to the data, before anything trains or resumes."""
    started = time.perf_counter()
    counts = []
    for layout in filter(None, (bundle.train, bundle.eval)):
        scores = []
        for local in layout.file_order():
            logps = step.reference(placed["trainable"], placed["frozen"], placed["dropout"],
                                   global_batch(local))
            scores.append(np.asarray(jax.device_get(logps)))
        layout.attach_ref_logps(np.concatenate(scores)[:layout.units])
        counts.append(layout.units)
    print(f"dpo: reference log-probabilities of {' + '.join(map(str, counts))} pairs in "
          f"{time.perf_counter() - started:.1f} s")


# --- plot (jaxft.plot) ---
def _write_plot(workdir: Path) -> None:
    """metrics.png beside metrics.jsonl; a plot must never fail a run that trained."""
    try:
        from jaxft.plot import plot_metrics

        print(f"plot: {plot_metrics(workdir)}")
    except Exception as e:  # matplotlib missing, a metrics file edited by hand: log, carry on
        logging.warning("no plot for %s: %s: %s", workdir, type(e).__name__, e)
# --- end plot ---


def _write_resolved_config(cfg, workdir: Path, hf_config: dict, model_path: str,
                           tokenizer_path: str, num_labels) -> None:
    resolved = cfg.to_dict()
    resolved["model"]["resolved_path"] = model_path
    resolved["model"]["resolved_tokenizer"] = tokenizer_path
    resolved["model"]["hf_config"] = hf_config
    if num_labels:
        resolved["model"]["num_labels"] = num_labels
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def _describe(metrics: dict[str, Any]) -> str:
    """'train_loss 2.314, lr 2e-05, tokens_per_s 31,940': floats to 4 digits (rates as whole
    numbers), counts with thousands separators, and no skipped_steps while there are none."""
    def shown(name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, int) or name.endswith("_per_s"):
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return ", ".join(f"{k} {shown(k, v)}" for k, v in metrics.items()
                     if not (k == "skipped_steps" and not v))


def main(argv: list[str]) -> None:
    cli.start(argv)
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/<recipe>.py is required")
    with cli.user_errors():
        if (FLAGS.topology or FLAGS.suggest) and not FLAGS.dry_run:
            raise JaxftError("--topology and --suggest plan a run; add --dry_run")
        if FLAGS.dry_run:  # --- dry run (jaxft.plan): compile abstractly, read no weights ---
            from jaxft.plan import dry_run, suggest

            if FLAGS.topology:  # compile-only devices: this process needs no accelerator
                jax.config.update("jax_platforms", "cpu")
            if FLAGS.suggest:
                suggest.print_suggestions(FLAGS.config, FLAGS.topology, sys.argv)
            else:
                dry_run.print_plan(FLAGS.config, FLAGS.topology)
            return
        try:
            final = run(FLAGS.config)
        except KeyboardInterrupt:
            print("aborted (a second Ctrl-C): checkpoints saved before are kept; run the same "
                  "command again to resume from the latest", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)
    if final.get("interrupted"):
        sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
