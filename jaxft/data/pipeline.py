"""`build_data`: from the `data` config section to batches the train step can consume.

    rows (sources.py) -> format (formats.py) -> examples (encode.py) -> rows of max_len tokens
    (packing.py) -> local batches in a resumable order (iterator.py)

The trainer calls it once, takes `bundle.train` (endless, `get_state`/`set_state` for
checkpoints) and `bundle.eval_batches()` (one finite pass), saves `bundle.save_label_map(path)`
for classification, and prints `bundle.describe()` and `bundle.notes`. A finished run is
evaluated with `build_eval`, which reads and tokenizes the eval rows alone, with the run's own
label map.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import datasets
import jax
import ml_collections
from transformers import PreTrainedTokenizerBase

from jaxft import progress, tasks
from jaxft.data import encode, formats, labels, packing, sources, stream
from jaxft.data.files import LOCATION_COLUMNS, Loaded
from jaxft.data.formats import Schema
from jaxft.data.iterator import Batch, EvalBatches, TrainIterator
from jaxft.data.stream import StreamedCorpus, StreamIterator
from jaxft.errors import JaxftError

log = logging.getLogger(__name__)
_LOSSES = {  # stats that mean data was altered or left out: always worth a warning
    "truncated": "were truncated to data.max_len (data.overlong='truncate')",
    "dropped_overlong": "were longer than data.max_len and dropped (data.overlong='drop')",
    "dropped_no_target": "had no tokens left to train on after truncation and were dropped",
    "skipped_bad_rows": "were malformed and skipped",
}


@dataclasses.dataclass
class DataBundle:
    """Everything the trainer needs from the data, built by `build_data`."""

    # endless local batches; get_state()/set_state() for exact resumption
    train: TrainIterator | StreamIterator
    eval: EvalBatches | None  # one pass per iteration; None when there is no eval data
    label_map: dict[str, int] | None  # {name: id} for classification, else None
    stats: dict[str, float]  # counts of rows, truncations, drops, tokens; packing efficiency
    format: str  # the resolved data format
    seq_len: int  # T of every [B, T] array
    sequences_per_row: int = 1  # 2 for preference pairs: their arrays are [B, 2, T]
    packed: bool = False  # several examples share a row
    chat_template: str | None = None  # what conversations rendered with; None: no chat data
    notes: list[str] = dataclasses.field(default_factory=list)  # data altered or left out
    streamed: StreamedCorpus | None = None  # data.streaming's corpus, still being tokenized

    def describe(self) -> str:
        """One line on what the run trains on: 'messages, 1,050 train + 118 eval examples,
        1,050 rows per epoch, packing efficiency 0.93, 24 truncated'."""
        if self.streamed is not None:
            s = self.streamed
            counts = (f", {self.stats['eval_examples']:,} eval examples"
                      if "eval_examples" in self.stats else "")
            return (f"text, streamed: {len(s.shards):,} shards of {s.origin}, "
                    f"{s.to_tokenize:,} of this process's {len(s.mine):,} to tokenize "
                    f"(cache {s.directory}){counts}, rows of {self.seq_len} tokens")
        unit = "pairs" if self.sequences_per_row == 2 else "examples"
        counts = f"{self.stats['examples']:,} train"
        if "eval_examples" in self.stats:
            counts += f" + {self.stats['eval_examples']:,} eval"
        parts = [self.format, f"{counts} {unit}",
                 f"{self.stats['rows_per_epoch']:,} rows of {self.seq_len} tokens per epoch"]
        if self.packed:
            parts.append(f"packing efficiency {self.stats['packing_efficiency']:.2f}")
        return ", ".join(parts)

    def close(self) -> None:
        """Stop a streamed corpus's tokenizing workers (nothing to do otherwise)."""
        if self.streamed is not None:
            self.streamed.close()

    def eval_batches(self) -> Iterator[Batch]:
        """One pass over the eval set as local batches (nothing when there is no eval set)."""
        return iter(self.eval) if self.eval is not None else iter(())

    def save_label_map(self, path: str | os.PathLike) -> None:
        """Write the label map as JSON {name: id}; an error for a task without labels."""
        if self.label_map is None:
            raise JaxftError("there is no label map to save: the data task is not classification")
        labels.save_label_map(self.label_map, path)


def build_data(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, *,
               global_batch_size: int, task: str = tasks.LM, process_index: int | None = None,
               process_count: int | None = None) -> DataBundle:
    """Load, tokenize and lay out the data named by `cfg` (see `jaxft.data.config`).

    Each process gets `global_batch_size / process_count` rows of every global batch; process
    index and count default to `jax.process_index()` / `jax.process_count()`. `datasets`' bars
    are drawn only where jaxft's are (`jaxft.progress`).
    """
    with progress.datasets_bars_follow():
        return _build_data(cfg, tokenizer, global_batch_size=global_batch_size, task=task,
                           process_index=process_index, process_count=process_count)


def _build_data(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, *,
                global_batch_size: int, task: str, process_index: int | None,
                process_count: int | None) -> DataBundle:
    if cfg.streaming:
        return _build_streamed(cfg, tokenizer, global_batch_size=global_batch_size, task=task,
                               process_index=process_index, process_count=process_count)
    split = sources.load_split(cfg.train_path, cfg.eval_path, eval_fraction=cfg.eval_fraction,
                               seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows,
                               text_column=cfg.text_column,
                               txt_document=cfg.txt_document)
    schema = formats.resolve(cfg, _data_columns(split.train), task, str(split.train.origin))
    if split.eval is not None:
        formats.require(schema, _data_columns(split.eval), str(split.eval.origin))
    label_map = _label_map(cfg, split, schema) if task == tasks.CLASSIFICATION else None
    pairs = schema.format == "preference"

    train_examples, stats = encode.encode(split.train, schema, tokenizer, cfg, label_map=label_map)
    layout = _layout(cfg, tokenizer, schema, global_batch_size, process_index, process_count)
    train = TrainIterator(train_examples, seed=cfg.seed, **layout)
    rows_per_epoch = len(train.epoch_rows(0))
    per_row = 2 if pairs else 1
    stats.update(rows_per_epoch=rows_per_epoch,  # (the share of row slots holding tokens)
                 packing_efficiency=round(packing.efficiency(
                     train_examples.lengths, rows_per_epoch * per_row, cfg.max_len), 4))
    eval_set = None
    if split.eval is not None:
        eval_examples, eval_stats = encode.encode(split.eval, schema, tokenizer, cfg,
                                                  label_map=label_map)
        eval_set = EvalBatches(eval_examples, **layout)
        stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
    log.info("data: %s (format %s): %s", split.train.origin, schema.format,
             ", ".join(f"{k}={v}" for k, v in stats.items()))
    notes = _notes(stats, split)
    return DataBundle(train, eval_set, label_map, stats, schema.format, cfg.max_len, per_row,
                      packed=train.packing, notes=notes,
                      chat_template=encode.chat_template_for(tokenizer, schema, split.train, cfg))


def _build_streamed(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, *,
                    global_batch_size: int, task: str, process_index: int | None,
                    process_count: int | None) -> DataBundle:
    """data.streaming: shards tokenized in the background, trained on as they finish."""
    if task != tasks.LM or cfg.format not in ("auto", "text"):
        raise JaxftError(f"data.streaming reads raw text for task 'lm' (data.format 'text'), "
                         f"not task {task!r} with data.format {cfg.format!r}")
    if not cfg.train_path:
        raise JaxftError("data.train_path is not set (a corpus file, directory or glob)")
    if not cfg.packing:
        raise JaxftError("data.streaming packs its rows (pieces of raw text, several to a row); "
                         "data.packing=False is for example-per-row data")
    if not 0 <= cfg.eval_fraction < 1:
        raise JaxftError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_len < 2:
        raise JaxftError(f"data.max_len must be at least 2, got {cfg.max_len}")
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    corpus = StreamedCorpus.open(cfg.train_path, cfg, tokenizer, holdout=_streamed_holdout(cfg),
                                 process_index=index, process_count=count)
    try:
        train = StreamIterator(corpus, seq_len=cfg.max_len, global_batch_size=global_batch_size,
                               seed=cfg.seed, pad_id=_pad_id(tokenizer), process_index=index,
                               process_count=count)
        eval_set = _streamed_eval(cfg, tokenizer, corpus, global_batch_size, index, count)
    except BaseException:
        corpus.close()
        raise
    stats: dict[str, float] = {"shards": len(corpus.shards)}
    if eval_set is not None:
        stats.update(eval_examples=len(eval_set.examples),
                     eval_tokens=int(len(eval_set.examples.tokens)))
    return DataBundle(train, eval_set, None, stats, "text", cfg.max_len, packed=True,
                      streamed=corpus)


def _streamed_holdout(cfg: ml_collections.ConfigDict) -> tuple[float, int] | None:
    """(fraction, seed) of the first shard's documents held out for eval, if any are."""
    return (cfg.eval_fraction, cfg.seed) if cfg.eval_fraction and not cfg.eval_path else None


def _streamed_eval(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase,
                   corpus: StreamedCorpus | None, global_batch_size: int, index: int,
                   count: int) -> EvalBatches | None:
    """A streamed corpus's eval set: data.eval_path's corpus, else the hold-out of the train
    corpus's first shard (`corpus`, or opened here for that shard alone); None without one."""
    if not cfg.eval_path and _streamed_holdout(cfg) is None:
        return None
    path = cfg.eval_path or cfg.train_path
    held_out = corpus if corpus is not None and not cfg.eval_path else StreamedCorpus.open(
        path, cfg, tokenizer, holdout=None if cfg.eval_path else _streamed_holdout(cfg),
        process_index=index, process_count=count, all_are_mine=bool(cfg.eval_path),
        eval_only=True)
    try:
        examples = stream.eval_examples(held_out, cfg.max_len)
    finally:
        if held_out is not corpus:
            held_out.close()
    if examples is None:
        return None
    return EvalBatches(examples, seq_len=cfg.max_len, global_batch_size=global_batch_size,
                       packing=True, pad_id=_pad_id(tokenizer), classification=False,
                       process_index=index, process_count=count)


def _notes(stats: dict[str, float], split: sources.Split) -> list[str]:
    """A line for each way rows were altered or left out, naming the first malformed row where
    its loader knows it (a malformed row found while tokenizing is named when
    data.skip_bad_rows is off: the run then stops at it)."""
    notes = []
    for prefix, loaded in (("", split.train), ("eval_", split.eval)):
        for key, what in _LOSSES.items():
            if not stats.get(prefix + key):
                continue
            count = stats[prefix + key]
            line = (f"{count:,} {'eval' if prefix else 'train'} "
                    + ("rows " + what if count != 1 else "row " + what.replace("were ", "was ")))
            if key == "skipped_bad_rows" and loaded is not None:
                line += (f"; the first: {loaded.first_bad}" if loaded.first_bad else
                         " (data.skip_bad_rows=False stops at the first and names it)")
            notes.append(line)
    return notes


@dataclasses.dataclass
class EvalData:
    """One eval set on its own, for a finished run (`build_eval`)."""

    batches: EvalBatches  # one pass in file order
    rows: datasets.Dataset  # the rows read (data columns plus `_file`/`_row`)
    columns: dict[str, str]  # the column of each role: 'text', 'text_pair', 'label' (if any), …
    stats: dict[str, int]  # counts of rows, truncations, drops, tokens
    origin: str  # the file(s) the rows came from, for messages

    @property
    def labelled(self) -> bool:
        """The rows carry what the loss needs: not so for classification rows to predict."""
        return not (self.batches.classification and "label" not in self.columns)


def build_eval(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, *,
               global_batch_size: int, task: str = tasks.LM,
               label_map: dict[str, int] | None = None, predict: bool = False,
               process_index: int | None = None, process_count: int | None = None) -> EvalData:
    """The eval set `cfg` names (`cfg.eval_path`, else the held-out split of `cfg.train_path`),
    laid out as `build_data` lays it out, without reading the train data when there is an eval
    file: a finished run is evaluated on new data without its train file.

    A classifier's class ids come from `label_map`, the run's own, never from the data: a new
    file may lack a class or order its labels differently, and a map built from it would give
    the head's classes other names. `datasets`' bars are drawn only where jaxft's are.

    With `predict` (rows to label), example i is row i of `rows`: the label column may be
    missing, an over-long text is truncated rather than dropped, and a malformed row is an
    error naming it rather than skipped, so every row gets its prediction.
    """
    if task == tasks.CLASSIFICATION and label_map is None:
        raise JaxftError("evaluating a classifier needs the label map it trained with")
    if cfg.streaming and task == tasks.LM and not predict:  # the eval set training used
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        batches = _streamed_eval(cfg, tokenizer, None, global_batch_size, index, count)
        if batches is None:
            raise JaxftError("no eval data: set data.eval_path, or data.eval_fraction > 0")
        return EvalData(batches, datasets.Dataset.from_dict({}), {"text": cfg.text_column},
                        {"examples": len(batches.examples)}, cfg.eval_path or cfg.train_path)
    if predict:
        cfg = cfg.copy_and_resolve_references()
        cfg.skip_bad_rows, cfg.overlong = False, "truncate"
    with progress.datasets_bars_follow():
        return _build_eval(cfg, tokenizer, global_batch_size=global_batch_size, task=task,
                           label_map=label_map, predict=predict, process_index=process_index,
                           process_count=process_count)


def _build_eval(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, *,
                global_batch_size: int, task: str, label_map: dict[str, int] | None,
                predict: bool, process_index: int | None,
                process_count: int | None) -> EvalData:
    loaded = sources.load_eval(cfg.train_path, cfg.eval_path, eval_fraction=cfg.eval_fraction,
                               seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows,
                               text_column=cfg.text_column,
                               txt_document=cfg.txt_document)
    if loaded is None:
        raise JaxftError("no eval data: set data.eval_path, or data.eval_fraction > 0")
    where = str(loaded.origin)
    schema = formats.resolve(cfg, _data_columns(loaded), task, where,
                             optional=("label",) if predict else ())
    examples, stats = encode.encode(loaded, schema, tokenizer, cfg, label_map=label_map)
    if predict and len(examples) != len(loaded.rows):
        raise JaxftError(f"{where}: {len(loaded.rows)} rows gave {len(examples)} examples; "
                         "predictions need one per row")
    batches = EvalBatches(examples, **_layout(cfg, tokenizer, schema, global_batch_size,
                                              process_index, process_count))
    return EvalData(batches, loaded.rows, dict(schema.columns), stats, where)


def _layout(cfg: ml_collections.ConfigDict, tokenizer: PreTrainedTokenizerBase, schema: Schema,
            global_batch_size: int, process_index: int | None,
            process_count: int | None) -> dict[str, object]:
    """How examples of `schema`'s format become rows and batches (train and eval alike)."""
    classification = schema.format == "classification"
    return dict(seq_len=cfg.max_len, global_batch_size=global_batch_size,
                packing=bool(cfg.packing) and not classification, pad_id=_pad_id(tokenizer),
                classification=classification, process_index=process_index,
                process_count=process_count, pairs=schema.format == "preference")


def _data_columns(loaded: Loaded) -> list[str]:
    return [c for c in loaded.rows.column_names if c not in LOCATION_COLUMNS]


def _label_map(cfg: ml_collections.ConfigDict, split: sources.Split,
               schema: formats.Schema) -> dict[str, int]:
    """The given label map, else one over the train and eval labels (a class seen only in eval
    still needs an id; a map from train alone would reject it)."""
    if cfg.label_map is not None:
        return labels.load_label_map(cfg.label_map)
    column = schema.columns["label"]
    values = list(split.train.rows[column])
    if split.eval is not None:
        values += list(split.eval.rows[column])
    return labels.build_label_map(values, str(split.train.origin))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written into padding slots; any id works (masks exclude them), pad is clearest."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

