r"""Evaluate a model on a dataset: loss and perplexity (LM), accuracy and macro-F1 (classification),
DPO's rewards (preference pairs).

  python -m jaxft.evaluate --config=configs/lora.py                 # the base model
  python -m jaxft.evaluate --workdir=runs/lora                      # a jaxft.train run
  python -m jaxft.evaluate --config=configs/lora.py --workdir=runs/lora \
      --config.data.eval_path=held_out.jsonl                        # a run, on other data

Prints one JSON line. With `--workdir` the model is the run's (its base model, LoRA setup and
the trainable weights of its latest checkpoint, from `W/config.json` and `W/checkpoints/`) and
the data is `--config`'s when given, else the run's own eval split.

The metric functions are plain numpy over gathered predictions, so the training loop can call
`classification_metrics` on what its eval step returns. Macro-F1 averages the per-class F1 over
every class that occurs among the labels or the predictions (scikit-learn's default), so a
class the model never predicts and never sees counts as nothing rather than as zero.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxft import dpo, progress, train_step
from jaxft.errors import JaxftError
from jaxft.tasks import TASKS

Batch = dict[str, np.ndarray]
MAX_LOG_PERPLEXITY = 50.0  # exp() overflows float64 near 709; a loss above 50 is already broken


# ---------------------------------------------------------------------------------------------
# Metrics: numpy in, floats out
# ---------------------------------------------------------------------------------------------


def macro_f1(predictions: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean over classes of 2·TP / (2·TP + FP + FN), classes = those in labels ∪ predictions."""
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if valid is not None:
        keep = np.asarray(valid).ravel() > 0
        predictions, labels = predictions[keep], labels[keep]
    classes = np.union1d(predictions, labels)
    if classes.size == 0:
        return float("nan")
    scores = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           valid: np.ndarray | None = None) -> dict[str, float]:
    """Cross-entropy loss, accuracy and macro-F1 of logits [N, C] against labels [N] over the
    rows where `valid` [N] is nonzero (all rows when None)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    keep = np.ones(len(labels), bool) if valid is None else np.asarray(valid) > 0
    logits, labels = logits[keep], labels[keep]
    if not len(labels):
        raise JaxftError("no valid rows to compute classification metrics on")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    predictions = logits.argmax(axis=-1)
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "accuracy": float(np.mean(predictions == labels)),
        "macro_f1": macro_f1(predictions, labels),
        "count": int(len(labels)),
    }


def lm_metrics(loss_sum: float, count: float) -> dict[str, float]:
    """Mean next-token loss and perplexity from a summed loss over `count` target tokens."""
    if not count:
        raise JaxftError("no target tokens to compute language-model metrics on")
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY)),
            "count": int(count)}


# ---------------------------------------------------------------------------------------------
# Evaluate a model over batches (jaxft.data's batch contract)
# ---------------------------------------------------------------------------------------------

LM_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")
CLASSIFICATION_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _lm_sums(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    model.eval()  # a merged copy: LoRA dropout off, the caller's model untouched
    return train_step.lm_losses(model, batch)


@functools.partial(jax.jit, static_argnames=("graphdef", "preference"))
def _preference_sums(graphdef: nnx.GraphDef, state: nnx.State, batch: dict,
                     preference: dpo.DpoConfig) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    model.eval()
    return dpo.preference_losses(preference)(model, batch)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reference_logps(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()
    return dpo.base_logps(model, batch)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _class_logits(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


def evaluate(model: nnx.Module, batches: Iterable[Batch], task: str,
             mesh: Mesh | None = None, preference: dpo.DpoConfig | None = None,
             reference: nnx.Module | None = None) -> dict[str, float]:
    """Metrics of `model` over `batches`: loss/perplexity (task 'lm'), loss/accuracy/macro-F1
    (task 'classification'), each over every target token or valid row of every batch, or
    the preference loss and TRL's reward metrics over every pair (task 'dpo', `preference`
    its loss; the reference is `reference` (a full fine-tune's initial model), else the
    model with its adapters off, or the batches' `ref_logps`).

    With a `mesh` the weights are sharded over it as training shards them (fsdp and tensor
    axes) and each batch's rows over its data axes, so a model too big for one device evaluates
    where it trained; each process passes its own rows.
    """
    if task not in TASKS:
        raise JaxftError(f"task {task!r} unknown (known: {', '.join(TASKS)})")
    graphdef, state = nnx.split(model)
    place = _on_one_device
    if mesh is not None:
        from jaxft import sharding
        from jaxft.data.iterator import to_global_arrays

        def put(state: nnx.State) -> nnx.State:
            return sharding.put_state(state, sharding.state_shardings(state, mesh))

        state = put(state)
        place = functools.partial(to_global_arrays, sharding=sharding.batch_sharding(mesh))
    if task == "dpo":
        if reference is not None:
            ref_graphdef, ref_state = nnx.split(reference)
            ref_state = ref_state if mesh is None else put(ref_state)

        def scored(batch: dict) -> dict:
            if reference is None:
                return batch
            return {**batch, "ref_logps": _reference_logps(ref_graphdef, ref_state, batch)}

        totals: dict[str, float] = {}
        for batch in progress.track(batches, desc="evaluating", unit="batch"):
            sums = jax.device_get(_preference_sums(graphdef, state, scored(place(batch)),
                                                   preference))
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
        if not totals.get("count"):
            raise JaxftError("no eval pairs")
        return dpo.metrics(totals)
    if task == "lm":
        loss_sum, count = 0.0, 0.0
        for batch in progress.track(batches, desc="evaluating", unit="batch"):
            sums = jax.device_get(_lm_sums(graphdef, state, place(_take(batch, LM_KEYS))))
            loss_sum, count = loss_sum + float(sums["loss_sum"]), count + float(sums["count"])
        return lm_metrics(loss_sum, count)
    logits, labels, valid = [], [], []
    for batch in progress.track(batches, desc="evaluating", unit="batch"):
        out = _class_logits(graphdef, state, place(_take(batch, CLASSIFICATION_KEYS)))
        logits.append(multihost_utils.process_allgather(out, tiled=True))
        local = (batch["labels"], batch.get("valid", np.ones(len(batch["labels"]), np.float32)))
        labels_here, valid_here = (multihost_utils.process_allgather(np.asarray(x), tiled=True)
                                   for x in local)
        labels.append(labels_here)
        valid.append(valid_here)
    if not logits:
        raise JaxftError("no eval batches")
    return classification_metrics(np.concatenate(logits), np.concatenate(labels),
                                  np.concatenate(valid))


def _take(batch: Batch, keys: tuple[str, ...]) -> Batch:
    return {k: np.asarray(batch[k]) for k in keys if k in batch}


def _on_one_device(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict | None, workdir: str | None = None, *,
        max_batches: int = 0, step: int | str | None = None) -> dict[str, Any]:
    """The CLI's work: pick model and data, evaluate, return the metrics. `step` picks a
    workdir's checkpoint (default: the newest; 'best': early stopping's best eval).

    The model is sharded over the mesh of `config` (else of the run), as training shards it.
    """
    from jaxft import config as config_lib
    from jaxft import data, hf_io, hub, lora, sharding

    if config is None and workdir is None:
        raise JaxftError("pass --config=configs/<recipe>.py, --workdir=<train workdir>, or both")
    if config is None:
        from jaxft.workdir import read_run_config

        mesh_cfg = read_run_config(workdir).mesh
    else:
        mesh_cfg = config.mesh
    mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    if workdir is not None:
        from jaxft.workdir import load_run

        trained = load_run(workdir, step, mesh=mesh)
        run_cfg, model, model_path = trained.config, trained.model, trained.base
        data_cfg = data.default_config()
        data_cfg.update((config if config is not None else run_cfg).data.to_dict())
        label_map = Path(workdir) / "label_map.json"
        if run_cfg.task == "classification" and data_cfg.label_map is None and label_map.exists():
            data_cfg.label_map = str(label_map)  # the ids the classifier was trained with
        task, batch_size = run_cfg.task, run_cfg.train.batch_size
    else:
        run_cfg, data_cfg = config, config.data
        task, batch_size = config.task, config.train.batch_size
        model_path = str(hub.resolve(config.model.path))
    if batch_size % sharding.data_parallel_size(mesh):
        raise JaxftError(f"eval batch size {batch_size} (train.batch_size) is not divisible by "
                         f"the mesh's data-parallel size {sharding.data_parallel_size(mesh)}")
    tokenizer = data.load_tokenizer(model_path)
    bundle = data.build_data(data_cfg, tokenizer, global_batch_size=batch_size, task=task)
    if bundle.eval is None:
        raise JaxftError("no eval data: set data.eval_path, or data.eval_fraction > 0")
    if workdir is None:
        num_labels = (config.model.num_labels or len(bundle.label_map)
                      if task == "classification" else None)
        model = hf_io.load_model(model_path, dtype=config.train.param_dtype,
                                 compute_dtype=config_lib.compute_dtype(config),
                                 num_labels=num_labels, seed=config.train.seed, mesh=mesh,
                                 quantize=config_lib.quant_config(config))
    preference, reference = None, None
    if task == "dpo":
        preference = config_lib.dpo_config(run_cfg)
        if not lora.has_adapters(model):  # a full fine-tune: its reference is the initial model
            reference = model if workdir is None else hf_io.load_model(
                model_path, dtype=run_cfg.train.param_dtype,
                compute_dtype=config_lib.compute_dtype(run_cfg), seed=run_cfg.train.seed,
                mesh=mesh)
    batches = itertools.islice(bundle.eval_batches(), max_batches or None)
    return {"task": task, "model": model_path, "workdir": workdir,
            **evaluate(model, batches, task, mesh, preference, reference)}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "A jaxft.train workdir: evaluate its latest checkpoint.")
    flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches (0 = all).")
    flags.DEFINE_string("step", None, "The workdir's checkpoint: a step number, or 'best' "
                        "(early stopping's best eval); default: the newest.")


def main(argv: list[str]) -> None:
    from absl import flags

    from jaxft import cli

    cli.start(argv)
    f = flags.FLAGS
    with cli.user_errors():
        metrics = run(f.config, f.workdir, max_batches=f.max_batches, step=f.step)
    print(json.dumps(metrics))


if __name__ == "__main__":
    from absl import app

    from jaxft import cli

    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
