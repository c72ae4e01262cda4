"""Read local data files into a `datasets.Dataset`, with every row remembering where it came from.

Accepted: `.jsonl`, `.json` (an array of objects, or JSON Lines), `.csv`, `.parquet` and `.txt`
(one document per blank-line-separated paragraph, or per file with data.txt_document='file'),
given as a file, a directory or a glob.

JSON is parsed here, line by line, rather than by the `datasets` json loader, because that loader
reports a bad line as an Arrow error without a line number. Every row gains two columns, `_file`
(index into `Origin.files`) and `_row` (1-based line or row number), so that a problem found much
later, say an unknown label during tokenization, can still name `file line N`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter

import datasets
import pandas as pd
import pyarrow as pa

from jaxft.errors import JaxftError, first_line

KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
LOCATION_COLUMNS = ("_file", "_row")


@dataclasses.dataclass(frozen=True)
class Origin:
    """The files behind a dataset, so that errors can say `file line N` for any row."""

    files: tuple[str, ...]
    unit: str = "row"  # what `_row` counts: 'line' for JSON Lines, 'row' otherwise

    def where(self, file_index: int, row: int) -> str:
        return f"{self.files[file_index]} {self.unit} {row}"

    def __str__(self) -> str:
        more = len(self.files) - 1
        return self.files[0] if not more else f"{self.files[0]} (+{more} more)"


@dataclasses.dataclass(frozen=True)
class Loaded:
    rows: datasets.Dataset
    origin: Origin
    bad_rows: int = 0  # malformed rows skipped because skip_bad_rows=True
    first_bad: str = ""  # where the first of them is and what is wrong with it, when known


def expand(path: str) -> list[str]:
    """The data files named by `path` (a file, directory or glob), sorted, all of one kind."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise JaxftError(f"no data files match {path}")
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in KINDS)
        if not files:
            raise JaxftError(f"{path}: directory holds no {'/'.join(KINDS)} files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise JaxftError(f"data file not found: {path}")
    kinds = {file_kind(f) for f in files}
    if len(kinds) > 1:
        raise JaxftError(f"{path}: mixes file types {sorted(kinds)}; use one type per source")
    return files


def file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in KINDS:
        raise JaxftError(f"{path}: unsupported file type '{ext}' (expected {', '.join(KINDS)})")
    return KINDS[ext]


def read_files(path: str, *, skip_bad_rows: bool, text_column: str = "text",
               txt_document: str = "paragraph") -> Loaded:
    """Load every file that `path` names into one Dataset plus its `Origin`; a `.txt` file is
    one document per blank-line paragraph, or with txt_document='file' one in all."""
    if txt_document not in ("paragraph", "file"):
        raise JaxftError(f"data.txt_document must be 'paragraph' or 'file', got "
                         f"{txt_document!r}")
    files = expand(path)
    kind = file_kind(files[0])
    if kind in ("jsonl", "json"):
        loaded = _read_json(files, skip_bad_rows)
    else:
        loaded = _read_tabulars(path, files, kind, skip_bad_rows, text_column, txt_document)
    if len(loaded.rows) == 0:
        skipped = f", {loaded.bad_rows} malformed rows skipped" if loaded.bad_rows else ""
        raise JaxftError(f"{path}: no rows (the dataset is empty{skipped})")
    return loaded


def _read_tabulars(path: str, files: list[str], kind: str, skip: bool, text_column: str,
                   txt_document: str) -> Loaded:
    parts, bad = [], 0
    for i, f in enumerate(files):
        ds, n_bad = _read_tabular(f, kind, skip, text_column, txt_document)
        bad += n_bad
        if len(ds):
            parts.append(ds.add_column("_file", [i] * len(ds))
                           .add_column("_row", list(range(1, len(ds) + 1))))
    try:
        rows = (datasets.Dataset.from_dict({}) if not parts else parts[0] if len(parts) == 1
                else datasets.concatenate_datasets(parts))
    except ValueError as e:
        raise JaxftError(f"{path}: files have different columns ({first_line(e)})") from e
    unit = ("paragraph" if txt_document == "paragraph" else "document") if kind == "txt" else "row"
    return Loaded(rows, Origin(tuple(files), unit), bad)


def _read_tabular(path: str, kind: str, skip: bool, text_column: str,
                  txt_document: str = "paragraph") -> tuple[datasets.Dataset, int]:
    kwargs = ({"sample_by": "paragraph" if txt_document == "paragraph" else "document"}
              if kind == "txt" else {})
    builder = {"csv": "csv", "parquet": "parquet", "txt": "text"}[kind]
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        if kind == "csv" and isinstance(cause, pd.errors.ParserError) and skip:
            return _read_csv_skipping(path)
        raise JaxftError(f"{path}: cannot read as {kind}: {first_line(cause)}") from e
    except (ValueError, pa.ArrowException) as e:  # pyarrow's ArrowInvalid is a ValueError too
        if "corresponds to no data" in str(e):  # how `datasets` reports an empty file
            return datasets.Dataset.from_dict({}), 0
        raise JaxftError(f"{path}: cannot read as {kind}: {first_line(e)}") from e
    if kind == "txt" and text_column != "text":
        ds = ds.rename_column("text", text_column)
    return ds, 0


def _read_csv_skipping(path: str) -> tuple[datasets.Dataset, int]:
    """The slow path, for a CSV with malformed lines and skip_bad_rows: count what is skipped."""
    bad: list[list[str]] = []
    frame = pd.read_csv(path, engine="python", on_bad_lines=lambda line: bad.append(line))
    return datasets.Dataset.from_pandas(frame, preserve_index=False), len(bad)


def _read_json(files: list[str], skip: bool) -> Loaded:
    records: list[dict] = []
    where: list[tuple[int, int]] = []
    bad = 0
    unit = "line"
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            data = fh.read()
        if os.path.splitext(path)[1].lower() == ".json" and data.lstrip()[:1] == b"[":
            items, n_bad = _json_array(path, data, skip)
            unit = "item"
        else:
            items, n_bad = _json_lines(path, data, skip)
        bad += n_bad
        for row, obj in items:
            records.append(obj)
            where.append((i, row))
    rows, misfits = _to_dataset(records, where, files, unit, skip)
    return Loaded(rows, Origin(tuple(files), unit), bad + misfits)


def _json_lines(path: str, data: bytes, skip: bool) -> tuple[list[tuple[int, dict]], int]:
    items, bad = [], 0
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(obj, dict) else f"expected a JSON object, got {_kind(obj)}"
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"malformed JSON ({e.msg} at column {e.colno})"
        if problem is None:
            items.append((n, obj))
        elif skip:
            bad += 1
        else:
            raise JaxftError(f"{path} line {n}: {problem}")
    return items, bad


def _json_array(path: str, data: bytes, skip: bool) -> tuple[list[tuple[int, dict]], int]:
    try:
        array = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JaxftError(f"{path}: not UTF-8 text (byte {e.start + 1})") from e
    except json.JSONDecodeError as e:  # one document: no row to skip, always an error
        raise JaxftError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
                         ) from e
    items, bad = [], 0
    for n, obj in enumerate(array, 1):
        if isinstance(obj, dict):
            items.append((n, obj))
        elif skip:
            bad += 1
        else:
            raise JaxftError(f"{path} item {n}: expected a JSON object, got {_kind(obj)}")
    return items, bad


def _to_dataset(records: list[dict], where: list[tuple[int, int]], files: list[str], unit: str,
                skip: bool) -> tuple[datasets.Dataset, int]:
    """Columns as Arrow wants them; rows whose value does not fit a column's type are errors,
    or are skipped (and counted) with skip_bad_rows."""
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r))
    dropped = 0
    for k in names:
        values = [r.get(k) for r in records]
        try:
            pa.array(values)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            misfits = _misfits(values)
            if not misfits:
                raise JaxftError(f"{files[0]}: column '{k}' cannot be stored ({first_line(e)})"
                                 ) from e
            if not skip:
                i, typical = misfits[0], _typical(values)
                what = (f"holds {_kind(values[i])} but most rows hold {_kind(typical)}"
                        if type(values[i]) is not type(typical)
                        else "has a different structure than in most rows")
                f, row = where[i]
                raise JaxftError(f"{files[f]} {unit} {row}: column '{k}' {what}") from e
        keep = sorted(set(range(len(records))) - set(misfits))
        records, where = [records[i] for i in keep], [where[i] for i in keep]
        dropped += len(misfits)
    columns = {k: [r.get(k) for r in records] for k in names}
    columns["_file"] = [w[0] for w in where]
    columns["_row"] = [w[1] for w in where]
    return datasets.Dataset.from_dict(columns), dropped


def _typical(values: list) -> object:
    """The first value of the column's most common Python type: what the column is meant to hold."""
    counts = Counter(type(v) for v in values if v is not None)
    common = counts.most_common(1)[0][0] if counts else type(None)
    return next((v for v in values if type(v) is common), None)


def _misfits(values: list) -> list[int]:
    """Indices of values that do not convert to the Arrow type of the column's typical value."""
    try:
        reference = pa.array([_typical(values)]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return []
    misfits = []
    for i, v in enumerate(values):
        try:
            pa.array([v], type=reference)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
            misfits.append(i)
    return misfits


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


