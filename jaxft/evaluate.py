r"""Evaluate a model on a dataset: loss and perplexity (LM), accuracy and macro-F1 (classification),
DPO's rewards (preference pairs).

  python -m jaxft.evaluate --config=configs/lora.py                 # the base model
  python -m jaxft.evaluate --workdir=runs/lora                      # a jaxft.train run
  python -m jaxft.evaluate --workdir=runs/lora --eval_path=held_out.jsonl   # a run, on new data
  python -m jaxft.evaluate --workdir=runs/bert_classify --eval_path=new.csv \
      --predictions=labelled.csv                                    # a classifier labels rows

Prints one JSON line. With `--workdir` the model is the run's (its base model, LoRA setup and
the trainable weights of its latest checkpoint, from `W/config.json` and `W/checkpoints/`) and
the data is `--eval_path` when given, else `--config`'s eval data when given, else the run's
own eval split. An eval file is read alone: the run's train file need not be there. A
classifier reads labels with its run's `label_map.json`, never with a map built from the new
file, so its class ids mean what they meant in training. `--predictions=out.csv` writes a
classifier's label for every row (the rows need no label column; a file that has one is
evaluated too), and refuses an existing file unless `--overwrite`.

There is one evaluation: `evaluate_batches` runs the eval step `jaxft.train_step` builds over a
model's batches, summing on the devices, and `metrics` turns the sums into numbers. The
training loop's evals and this command both run exactly these two, so the `eval_loss` a run
logs and the `loss` this command prints for its checkpoint are the same number. Macro-F1 comes
from the summed confusion matrix and averages the per-class F1 over every class that occurs
among the labels or the predictions (scikit-learn's default), so a class the model never
predicts and never sees counts as nothing rather than as zero.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import dpo, lora, outdir, progress, sharding, spec, tasks, train_step
from jaxft.data.iterator import to_global_arrays
from jaxft.errors import JaxftError

if TYPE_CHECKING:
    from jaxft.data import EvalData

Batch = dict[str, np.ndarray]
MAX_LOG_PERPLEXITY = 50.0  # exp() overflows float64 near 709; a loss above 50 is already broken


# ---------------------------------------------------------------------------------------------
# Metrics: summed values in, floats out
# ---------------------------------------------------------------------------------------------


def metrics(sums: dict[str, Any], task: str) -> dict[str, float]:
    """An evaluation's numbers from its sums (host values of `train_step.zero_sums`' keys): the
    mean loss and `count` (target tokens, rows or pairs), with perplexity (task 'lm'),
    accuracy and macro-F1 (task 'classification'), or TRL's reward metrics (task 'dpo').
    The training loop logs them as `eval_<name>`."""
    count = float(sums["count"])
    if task == tasks.DPO:
        return {**dpo.metrics(sums), "count": int(count)}
    result = lm_metrics(float(sums["loss_sum"]), count)
    if task == tasks.LM:
        return result
    result.pop("perplexity")
    result["accuracy"] = float(sums["correct"]) / count
    if "confusion" in sums:
        result["macro_f1"] = macro_f1_of(np.asarray(sums["confusion"]))
    return result


def lm_metrics(loss_sum: float, count: float) -> dict[str, float]:
    """Mean loss and perplexity from a summed loss over `count` target tokens (or rows)."""
    if not count:
        raise JaxftError("no target tokens to compute language-model metrics on")
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY)),
            "count": int(count)}


def macro_f1_of(confusion: np.ndarray) -> float:
    """Mean over classes of 2·TP / (2·TP + FP + FN) from a confusion matrix [predicted, label],
    classes = those that occur as a label or a prediction."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    predicted, actual = confusion.sum(axis=1), confusion.sum(axis=0)
    seen = (predicted + actual) > 0
    if not seen.any():
        return float("nan")
    return float(np.mean(2 * tp[seen] / (predicted[seen] + actual[seen])))


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, classes: int,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """[predicted, label] counts over the rows where `valid` is nonzero (all when None)."""
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    weights = np.ones(len(labels)) if valid is None else (np.asarray(valid).ravel() > 0)
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (predictions, labels), weights)
    return confusion


def macro_f1(predictions: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Macro-F1 of predictions against labels (see `macro_f1_of`), rows with `valid` 0 left
    out, their classes too."""
    classes = int(max(np.max(predictions, initial=0), np.max(labels, initial=0))) + 1
    return macro_f1_of(confusion_matrix(predictions, labels, classes, valid))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           valid: np.ndarray | None = None) -> dict[str, float]:
    """`metrics` of a classifier's logits [N, C] against labels [N], computed on the host in
    float64, over the rows where `valid` [N] is nonzero (all rows when None)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    keep = np.ones(len(labels), bool) if valid is None else np.asarray(valid) > 0
    logits, labels = logits[keep], labels[keep]
    if not len(labels):
        raise JaxftError("no valid rows to compute classification metrics on")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    predictions = logits.argmax(axis=-1)
    sums = {"loss_sum": -log_probs[np.arange(len(labels)), labels].sum(), "count": len(labels),
            "correct": np.sum(predictions == labels),
            "confusion": confusion_matrix(predictions, labels, logits.shape[-1])}
    return metrics(sums, tasks.CLASSIFICATION)


# ---------------------------------------------------------------------------------------------
# The evaluation: the eval step over batches, summed on the devices, read once
# ---------------------------------------------------------------------------------------------


def evaluate_batches(evaluation: train_step.Evaluation, params: tuple[Any, Any, Any],
                     batches: Iterable[Batch],
                     to_device: Callable[[Batch], dict[str, jax.Array]]) -> dict[str, Any]:
    """The summed eval step (`evaluation.evaluate`) of `params` (trainable, frozen, dropout,
    placed) over `batches` (each process's own rows, `jaxft.data`'s batch contract), each
    made global by `to_device`; the sums, read from the devices once."""
    sums = evaluation.zero_sums()
    for local in progress.track(batches, desc="evaluating", unit="batch"):
        sums = evaluation.evaluate(*params, sums, to_device(local))
    return jax.device_get(sums)


def with_reference(evaluation: train_step.Evaluation, reference: Any, frozen: Any, dropout: Any,
                   to_device: Callable[[Batch], dict[str, jax.Array]]
                   ) -> Callable[[Batch], dict[str, jax.Array]]:
    """`to_device` whose preference pairs also carry `ref_logps`, scored with the trainable
    weights `reference` (a full fine-tune's initial ones, sharded like the trained ones)."""

    def scored(local: Batch) -> dict[str, jax.Array]:
        batch = to_device(local)
        return {**batch, "ref_logps": evaluation.reference(reference, frozen, dropout, batch)}

    return scored


def evaluate(model: nnx.Module, batches: Iterable[Batch], task: str,
             mesh: Mesh | None = None, preference: dpo.DpoConfig | None = None,
             reference: nnx.Module | None = None, *,
             lora_cfg: lora.LoraConfig | None = None) -> dict[str, float]:
    """`metrics` of `model` over `batches`: loss/perplexity (task 'lm'), loss/accuracy/macro-F1
    (task 'classification'), each over every target token or valid row of every batch, or
    the preference loss and TRL's reward metrics over every pair (task 'dpo', `preference`
    its loss; the reference is `reference` (a full fine-tune's initial model), else the
    model with its adapters off, or the batches' `ref_logps`).

    With a `mesh` the weights are sharded over it as training shards them (fsdp and tensor
    axes) and each batch's rows over its data axes, so a model too big for one device evaluates
    where it trained; each process passes its own rows. Without one, on one device.
    `lora_cfg` splits the model as the run that trained it did (what trains, what is frozen),
    so the program is the one its training loop evaluated with.
    """
    evaluation, params, to_device = _prepare(model, task, mesh, lora_cfg, preference, reference)
    sums = evaluate_batches(evaluation, params, batches, to_device)
    if not sums["count"]:
        raise JaxftError(f"no eval {'pairs' if task == tasks.DPO else 'batches'}")
    return metrics(sums, task)


def _prepare(model: nnx.Module, task: str, mesh: Mesh | None,
             lora_cfg: lora.LoraConfig | None, preference: dpo.DpoConfig | None = None,
             reference: nnx.Module | None = None
             ) -> tuple[train_step.Evaluation, tuple[Any, Any, Any],
                        Callable[[Batch], dict[str, jax.Array]]]:
    """The eval step of `model` on `mesh` (one device without one), its weights placed there,
    and what makes a process's rows a global batch (with DPO's `reference` scores, if any)."""
    if task not in tasks.TASKS:
        raise JaxftError(f"task {task!r} unknown (known: {', '.join(tasks.TASKS)})")
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    evaluation, states = train_step.build_evaluation(model, mesh, task, lora_cfg=lora_cfg,
                                                     preference=preference,
                                                     reference=reference is not None)
    placed = evaluation.place(states)
    params = (placed["trainable"], placed["frozen"], placed["dropout"])
    to_device = _to_device(mesh)
    if reference is not None:  # its weights split as the model's are, on the same shardings
        ref_trainable = evaluation.place(train_step.split(reference, lora_cfg)[2])["trainable"]
        to_device = with_reference(evaluation, ref_trainable, placed["frozen"],
                                   placed["dropout"], to_device)
    return evaluation, params, to_device


def _to_device(mesh: Mesh) -> Callable[[Batch], dict[str, jax.Array]]:
    batch_sharding = sharding.batch_sharding(mesh)
    return lambda local: to_global_arrays(local, batch_sharding)


# ---------------------------------------------------------------------------------------------
# Predictions: a classifier's label for every row, written as CSV
# ---------------------------------------------------------------------------------------------

PREDICTED, PROBABILITY = "predicted_label", "probability"  # the columns predictions add


def classify(model: nnx.Module, batches: Callable[[], Iterable[Batch]], mesh: Mesh | None = None,
             *, lora_cfg: lora.LoraConfig | None = None,
             labelled: bool = True) -> tuple[dict[str, float] | None, np.ndarray]:
    """A classifier's class probabilities [N, C] for the N valid rows of `batches()` (a fresh
    pass each call), in their order, and, when the rows are `labelled`, the `metrics` that
    `evaluate` gives them (the same eval step and sums; None otherwise). The weights are
    placed once for both passes."""
    evaluation, params, to_device = _prepare(model, tasks.CLASSIFICATION, mesh, lora_cfg)
    found = None
    if labelled:
        sums = evaluate_batches(evaluation, params, batches(), to_device)
        if not sums["count"]:
            raise JaxftError("no eval batches")
        found = metrics(sums, tasks.CLASSIFICATION)
    return found, probabilities_of(evaluation, params, batches(), to_device)


def probabilities_of(evaluation: train_step.Evaluation, params: tuple[Any, Any, Any],
                     batches: Iterable[Batch],
                     to_device: Callable[[Batch], dict[str, jax.Array]]) -> np.ndarray:
    """Class probabilities [N, C] (float32 softmax of the logits the eval step scores) of the
    valid rows of `batches`, in order; every process gets all of them."""
    step = jax.jit(sharding.traced_under(evaluation.mesh,
                                         _probability_step(evaluation.eval_graphdef)),
                   in_shardings=(evaluation.shardings["trainable"],
                                 evaluation.shardings["frozen"],
                                 evaluation.shardings["dropout"], None),
                   out_shardings=evaluation.replicated)
    found = []
    for local in progress.track(batches, desc="predicting", unit="batch"):
        probabilities, valid = jax.device_get(step(*params, to_device(local)))
        found.append(np.asarray(probabilities)[np.asarray(valid) > 0])
    return np.concatenate(found) if found else np.zeros((0, evaluation.num_labels), np.float32)


def _probability_step(graphdef: nnx.GraphDef) -> Callable:
    def probabilities(trainable, frozen, dropout, batch):
        logits = train_step.classifier_logits(nnx.merge(graphdef, trainable, frozen, dropout),
                                              batch)
        return jax.nn.softmax(logits, axis=-1), batch["valid"]

    return probabilities


def prediction_table(rows: dict[str, list], columns: dict[str, str], probabilities: np.ndarray,
                     id2label: dict[str, str]) -> tuple[list[str], list[list[Any]]]:
    """The predictions file's header and rows: each input row's text column(s) and label (when
    it has one) as given, the predicted label's name and that label's probability."""
    given = [columns[role] for role in ("text", "text_pair", "label") if role in columns]
    predicted = probabilities.argmax(axis=-1)
    table = [[rows[c][i] for c in given]
             + [id2label[str(int(k))], f"{float(probabilities[i, k]):.6f}"]
             for i, k in enumerate(predicted)]
    return [*given, PREDICTED, PROBABILITY], table


def write_predictions(out: Path, header: list[str], table: list[list[Any]], *,
                      overwrite: bool) -> None:
    """Write the predictions CSV whole (a temporary file beside `out`, then renamed), checked
    again first: the file may have appeared while the model ran. Process 0 writes."""
    if jax.process_index() != 0:
        return
    outdir.check_output_file(out, overwrite=overwrite, what="predictions file")
    with outdir.whole_file(out) as temporary, temporary.open("w", newline="",
                                                              encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(table)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict | None, workdir: str | None = None, *,
        max_batches: int = 0, step: int | str | None = None, eval_path: str | None = None,
        predictions: str | os.PathLike | None = None, overwrite: bool = False
        ) -> dict[str, Any]:
    """The CLI's work: pick model and data, evaluate, return the metrics. `step` picks a
    workdir's checkpoint (default: the newest; 'best': early stopping's best eval);
    `eval_path` names the data to evaluate on instead of the config's eval data.
    `predictions` (a classifier's workdir) is a CSV file to write with every row's predicted
    label; its rows need no labels (then there are no metrics). An existing file is replaced
    only with `overwrite`.

    The model is sharded over the mesh of `config` (else of the run), as training shards it,
    and evaluated with the eval step training runs. A workdir's run is evaluated on its eval
    rows alone (an eval file never needs the train file beside it), a classifier with the
    label map it trained with.
    """
    from jaxft.workdir import read_run_config

    if config is None and workdir is None:
        raise JaxftError("pass --config=configs/<recipe>.py, --workdir=<train workdir>, or both")
    if max_batches < 0:
        raise JaxftError(f"--max_batches must be >= 0 (0: all), got {max_batches}")
    saved = read_run_config(workdir) if workdir is not None else None
    if predictions is not None:
        predictions = _check_predictions(predictions, workdir, saved, overwrite)
    mesh_cfg = (saved if config is None else config).mesh
    mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor,
                              expert=mesh_cfg.get("expert", 1))
    data_cfg = _data_config(config if config is not None else saved, eval_path)
    if workdir is None:
        return _run_base(config, data_cfg, mesh, max_batches)
    return _run_workdir(workdir, saved, data_cfg, mesh, max_batches, step, predictions,
                        overwrite)


def _check_predictions(out: str | os.PathLike, workdir: str | None,
                       saved: ml_collections.ConfigDict | None, overwrite: bool) -> Path:
    """Refuse `--predictions` where it cannot be honoured, in one line, before anything loads:
    only a trained classifier has label names to write."""
    if workdir is None:
        raise JaxftError("--predictions needs --workdir: it labels rows with a trained "
                         "classifier's label names")
    if saved.task != tasks.CLASSIFICATION:
        raise JaxftError(f"--predictions labels rows with a classifier's label names; "
                         f"{workdir} is a {saved.task!r} run")
    return outdir.check_output_file(out, overwrite=overwrite, what="predictions file")


def _data_config(config: ml_collections.ConfigDict,
                 eval_path: str | None) -> ml_collections.ConfigDict:
    """The `data` section to evaluate with: `config`'s over today's defaults (a saved run's
    config lacks fields added since), `eval_path` in place of its eval data."""
    from jaxft import data

    data_cfg = data.default_config()
    data_cfg.update(config.data.to_dict())
    if eval_path:
        data_cfg.eval_path = eval_path
    return data_cfg


def _check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % sharding.data_parallel_size(mesh):
        raise JaxftError(f"eval batch size {batch_size} (train.batch_size) is not divisible by "
                         f"the mesh's data-parallel size {sharding.data_parallel_size(mesh)}")


def _scores_losses(task: str) -> None:
    """This command scores losses on labelled rows; GRPO has none to score."""
    if task == tasks.GRPO:
        raise JaxftError("task 'grpo' has no loss to evaluate on fixed rows: its eval is the "
                         "held-out prompts' reward (eval_reward), which jaxft.train logs; "
                         "score other prompts with python -m jaxft.generate --workdir=...")


def _run_base(config: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
              mesh: Mesh, max_batches: int) -> dict[str, Any]:
    """A config's base model (a classifier's head fresh, sized by the data's label map)."""
    from jaxft import data
    from jaxft.hf import weights

    run_spec = spec.resolve(config)
    _scores_losses(run_spec.task)
    model_path, tokenizer_path = spec.model_paths(config)
    task, batch_size = run_spec.task, run_spec.train.batch_size
    _check_batch_size(batch_size, mesh)
    bundle = data.build_data(data_cfg, data.load_tokenizer(tokenizer_path),
                             global_batch_size=batch_size, task=task)
    bundle.close()  # (a streamed corpus: its eval rows are read, the rest is not needed)
    if bundle.eval is None:
        raise JaxftError("no eval data: set data.eval_path, or data.eval_fraction > 0")
    num_labels = (config.model.num_labels or len(bundle.label_map)
                  if task == tasks.CLASSIFICATION else None)
    model = weights.load_hf_model(model_path, run_spec.model_options(num_labels), mesh=mesh)
    batches = itertools.islice(bundle.eval_batches(), max_batches or None)
    return {"task": task, "model": model_path, "workdir": None,
            **evaluate(model, batches, task, mesh, run_spec.dpo, model if task == tasks.DPO
                       and not lora.has_adapters(model) else None)}


def _run_workdir(workdir: str, saved: ml_collections.ConfigDict,
                 data_cfg: ml_collections.ConfigDict, mesh: Mesh, max_batches: int,
                 step: int | str | None, predictions: Path | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """A training run's checkpoint, on the eval rows `data_cfg` names (and with `predictions`,
    every row's predicted label written there). The data is read and checked before any
    weight loads, so a bad file is refused in seconds."""
    from jaxft import data
    from jaxft.hf import weights
    from jaxft.workdir import load_run, saved_tokenizer_path

    run_spec = spec.of_saved_run(saved)
    _scores_losses(run_spec.task)
    task, batch_size, model_path = run_spec.task, run_spec.train.batch_size, \
        saved.model.resolved_path
    _check_batch_size(batch_size, mesh)
    label_map = _run_label_map(workdir, task, data_cfg)
    eval_data = data.build_eval(data_cfg, data.load_tokenizer(saved_tokenizer_path(saved)),
                                global_batch_size=batch_size, task=task, label_map=label_map,
                                predict=predictions is not None)
    model = load_run(workdir, step, mesh=mesh).model
    head = {"task": task, "model": model_path, "workdir": workdir}
    if predictions is not None:
        return {**head, **_predict(model, eval_data, label_map, mesh, run_spec.lora,
                                   max_batches, predictions, overwrite)}
    reference = None
    if task == tasks.DPO and not lora.has_adapters(model):
        # a full fine-tune's reference is its initial model, the base weights (under LoRA it is
        # the model with its adapters off, which the eval step scores itself)
        reference = weights.load_hf_model(model_path, run_spec.model_options(), mesh=mesh)
    batches = itertools.islice(iter(eval_data.batches), max_batches or None)
    return {**head, **evaluate(model, batches, task, mesh, run_spec.dpo, reference,
                               lora_cfg=run_spec.lora)}


def _predict(model: nnx.Module, eval_data: EvalData, label_map: dict[str, int], mesh: Mesh,
             lora_cfg: lora.LoraConfig | None, max_batches: int, out: Path,
             overwrite: bool) -> dict[str, Any]:
    """Label every row of `eval_data` with the run's label names and write them to `out`;
    the metrics too, when the rows have labels."""
    from jaxft.hf import weights

    found, probabilities = classify(
        model, lambda: itertools.islice(iter(eval_data.batches), max_batches or None), mesh,
        lora_cfg=lora_cfg, labelled=eval_data.labelled)
    id2label = weights.label_fields(label_map, probabilities.shape[-1])["id2label"]
    rows = eval_data.rows.select_columns(list(eval_data.columns.values()))[:len(probabilities)]
    header, table = prediction_table(rows, eval_data.columns, probabilities, id2label)
    write_predictions(out, header, table, overwrite=overwrite)
    return {**(found or {}), "predictions": str(out), "predicted": len(table)}


def _run_label_map(workdir: str, task: str,
                   data_cfg: ml_collections.ConfigDict) -> dict[str, int] | None:
    """A classifier's label map: the one its run saved (`W/label_map.json`), which alone says
    which class each head output is; a run that saved none falls back to `data.label_map`."""
    from jaxft.data import labels
    from jaxft.workdir import LABEL_MAP, read_label_map

    if task != tasks.CLASSIFICATION:
        return None
    saved = read_label_map(workdir)
    if saved is not None:
        return saved
    if data_cfg.label_map is not None:
        return labels.load_label_map(data_cfg.label_map)
    raise JaxftError(f"{Path(workdir) / LABEL_MAP}: not found (a classification run saves its "
                     "label map there; pass --config.data.label_map to give it)")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "A jaxft.train workdir: evaluate its latest checkpoint.")
    flags.DEFINE_string("eval_path", None, "Data to evaluate on (a file, directory or glob, in "
                        "the run's format and columns) instead of the run's (or --config's) eval "
                        "data; with --workdir the train data is never read, and a classifier's "
                        "labels are those of its label_map.json.")
    flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches (0 = all).")
    flags.DEFINE_string("step", None, "The workdir's checkpoint: a step number, or 'best' "
                        "(early stopping's best eval); default: the newest.")
    flags.DEFINE_string("predictions", None, "A classifier's workdir: write a CSV file here with "
                        "one row per example (its text column(s) and label, if any, as given), "
                        f"its {PREDICTED} (a name from the run's label_map.json) and that "
                        f"label's {PROBABILITY}. The rows need no label column; when they have "
                        "one, the metrics are printed too. Its directory must exist.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --predictions file.")


def main(argv: list[str]) -> None:
    from absl import flags

    from jaxft import cli

    cli.start(argv)
    f = flags.FLAGS
    with cli.user_errors():
        result = run(f.config, f.workdir, max_batches=f.max_batches, step=f.step,
                     eval_path=f.eval_path, predictions=f.predictions, overwrite=f.overwrite)
    print(json.dumps(result))


if __name__ == "__main__":
    from absl import app

    from jaxft import cli

    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
