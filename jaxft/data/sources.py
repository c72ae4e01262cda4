"""Turn `data.train_path` / `data.eval_path` into train and eval rows.

A path names, in this order of precedence: a built-in source (`chatterbot:...`), local files (it
exists, has a file extension, contains a glob character or starts like a path), or else a hub
dataset loaded with `datasets.load_dataset(name)`. Eval rows come from `eval_path`, else from the
source's own eval split (built-ins, hub `validation`/`test`), else from a seeded hold-out of
`eval_fraction` of the train rows, taken before tokenization so no document leaks across.
`eval_fraction=0` means no eval set unless `eval_path` is given.
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np

from jaxft.data import chatterbot, files
from jaxft.data.files import Loaded, Origin
from jaxft.data.order import holdout
from jaxft.errors import JaxftError, first_line
from jaxft.hf import hub


@dataclasses.dataclass(frozen=True)
class Split:
    train: Loaded
    eval: Loaded | None


def load_split(train_path: str | None, eval_path: str | None, *, eval_fraction: float, seed: int,
               skip_bad_rows: bool, text_column: str, txt_document: str = "paragraph") -> Split:
    """Train rows and (possibly no) eval rows, as the config asks."""
    if not train_path:
        raise JaxftError("data.train_path is not set (a data file, glob, hub name or built-in)")
    if not 0 <= eval_fraction < 1:
        raise JaxftError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    train, own_eval = _load(train_path, skip_bad_rows, text_column, txt_document)
    if eval_path:
        return Split(train, _load(eval_path, skip_bad_rows, text_column, txt_document)[0])
    if eval_fraction == 0:  # no eval, even where the source has its own eval split
        return Split(train, None)
    if own_eval is not None:
        return Split(train, own_eval)
    keep, held = holdout(len(train.rows), eval_fraction, seed)
    if len(held) == 0:
        return Split(train, None)
    return Split(_select(train, keep), _select(train, held, bad_rows=0))


def load_eval(train_path: str | None, eval_path: str | None, *, eval_fraction: float, seed: int,
              skip_bad_rows: bool, text_column: str,
              txt_document: str = "paragraph") -> Loaded | None:
    """Only the eval rows, as `load_split` would give them: the rows of `eval_path` when it is
    set (the train data is then never read, so a finished run evaluates on new data without
    its train file), else the eval split of `train_path`; None when there is none."""
    if eval_path:
        return _load(eval_path, skip_bad_rows, text_column, txt_document)[0]
    return load_split(train_path, None, eval_fraction=eval_fraction, seed=seed,
                      skip_bad_rows=skip_bad_rows, text_column=text_column,
                      txt_document=txt_document).eval


def _select(loaded: Loaded, indices: np.ndarray, **changes) -> Loaded:
    return dataclasses.replace(loaded, rows=loaded.rows.select(indices), **changes)


def _load(path: str, skip_bad_rows: bool, text_column: str,
          txt_document: str = "paragraph") -> tuple[Loaded, Loaded | None]:
    if path.startswith("chatterbot:"):
        return chatterbot.load(path)
    if hub.looks_local(path):
        return files.read_files(path, skip_bad_rows=skip_bad_rows, text_column=text_column,
                                txt_document=txt_document), None
    return _load_hub(path)


def _load_hub(name: str) -> tuple[Loaded, Loaded | None]:
    """A hub dataset's `train` split, and its `validation` or `test` split as eval if it has one."""
    try:
        splits = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types; report them all
        raise JaxftError(f"'{name}' is not a local file and could not be loaded from the Hugging "
                         f"Face hub ({first_line(e)[:200]})") from e
    if "train" not in splits:
        raise JaxftError(f"hub dataset '{name}' has no 'train' split (found {list(splits)})")
    eval_split = next((s for s in ("validation", "test") if s in splits), None)
    train = _with_location(splits["train"], f"{name}[train]")
    if eval_split is None:
        return train, None
    return train, _with_location(splits[eval_split], f"{name}[{eval_split}]")


def _with_location(rows: datasets.Dataset, label: str) -> Loaded:
    rows = rows.add_column("_file", [0] * len(rows)).add_column("_row", range(1, len(rows) + 1))
    return Loaded(rows, Origin((label,), "row"))
