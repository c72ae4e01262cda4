"""A raw-text corpus cut into shards: units of work that can be tokenized apart and in any order.

    shards = plan_shards("corpus/**/*.jsonl.gz", shard_bytes=8 << 20, document="paragraph")
    texts, bad = read_documents(shards[3], text_column="text", document="paragraph", skip=False)

What a shard is, by kind of file:

| files                        | a shard                                  | a document         |
|------------------------------|------------------------------------------|--------------------|
| `.jsonl`                     | a byte range of ~shard_bytes, cut at a   | a line's text      |
|                              | line's end                               | column             |
| `.jsonl.gz`, `.json.gz`      | one file (gzip cannot be entered midway) | a line's text col. |
| `.parquet`                   | a run of row groups of ~shard_bytes      | a row's text col.  |
| `.txt` (document=paragraph)  | a byte range, cut after a blank line     | a paragraph        |
| `.txt` (document=file), any  | whole files grouped to ~shard_bytes      | a whole file       |
| other extension (a code base)|                                          |                    |
| a hub dataset (`hub_shards`) | one of its data files, streamed          | a row's text col.  |

Shards are planned from file sizes (plus a short read at each cut), never by reading the corpus,
so a corpus of any size is planned in a moment and its first shard can be tokenized at once.
Only this module and `jaxft.data.tokenize_worker` read the corpus's bytes; it imports nothing
heavier than pyarrow, since it runs in every tokenizing worker.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib

from jaxft.errors import JaxftError, first_line

DOCUMENTS = ("paragraph", "file")
_JSON_LINES = (".jsonl", ".jsonl.gz", ".json.gz")
_SKIPPED_DIRS = {".git", "__pycache__", ".jaxft_cache", "node_modules"}


@dataclasses.dataclass(frozen=True)
class Shard:
    """Files (or one file's byte range or row groups) tokenized as one unit."""

    kind: str  # 'jsonl', 'jsonl.gz', 'parquet', 'paragraphs' or 'files'
    files: tuple[str, ...]
    start: int = 0  # byte offset (jsonl, paragraphs) or first row group (parquet)
    stop: int = -1  # end byte or row group, exclusive; -1: to the end

    def identity(self) -> list:
        """What the tokens of this shard depend on, as JSON: files with size and time, range
        (a hub dataset's shard: its name, index and count)."""
        if self.kind == "hub":
            return [self.kind, list(self.files), self.start, self.stop]
        stamps = [[f, *_stamp(f)] for f in self.files]
        return [self.kind, stamps, self.start, self.stop]

    def describe(self) -> str:
        more = len(self.files) - 1
        head = self.files[0] if not more else f"{self.files[0]} (+{more})"
        return head if self.stop < 0 and self.start == 0 else f"{head} [{self.start}:{self.stop}]"


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def corpus_files(path: str) -> list[str]:
    """The files `path` names: a file, a glob (`**` recursive), or a directory tree (every
    file under it, hidden and cache directories left out), sorted."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
            files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        files.sort()
    elif os.path.isfile(path):
        files = [path]
    else:
        raise JaxftError(f"data file not found: {path}")
    if not files:
        raise JaxftError(f"no data files match {path}")
    return files


def kind_of(path: str, document: str) -> str:
    """How a file is read: 'jsonl', 'jsonl.gz', 'parquet', 'paragraphs' or 'files'."""
    name = path.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".json", ".csv")):
        raise JaxftError(f"{path}: data.streaming reads .jsonl, .jsonl.gz, .parquet and text "
                         "files; convert .json/.csv to JSON Lines, or turn data.streaming off")
    return "paragraphs" if name.endswith(".txt") and document == "paragraph" else "files"


def plan_shards(path: str, *, shard_bytes: int, document: str) -> list[Shard]:
    """The shards of the corpus `path` names, in file order."""
    if document not in DOCUMENTS:
        raise JaxftError(f"data.txt_document must be one of {DOCUMENTS}, got {document!r}")
    files = corpus_files(path)
    kinds = {kind_of(f, document) for f in files}
    if len(kinds) > 1 and not kinds <= {"jsonl", "jsonl.gz"}:
        raise JaxftError(f"{path}: mixes kinds of files ({', '.join(sorted(kinds))}); use one "
                         "kind per corpus")
    shards: list[Shard] = []
    group: list[str] = []
    group_bytes = 0
    for f in files:
        kind = kind_of(f, document)
        if kind == "files":  # whole files, grouped until a shard's worth of bytes
            group.append(f)
            group_bytes += os.path.getsize(f)
            if group_bytes >= shard_bytes:
                shards.append(Shard("files", tuple(group)))
                group, group_bytes = [], 0
        elif kind == "jsonl.gz":
            shards.append(Shard(kind, (f,)))
        elif kind == "parquet":
            shards += _parquet_shards(f, shard_bytes)
        else:
            shards += _byte_ranges(f, kind, shard_bytes)
    if group:
        shards.append(Shard("files", tuple(group)))
    return shards


def _byte_ranges(path: str, kind: str, shard_bytes: int) -> list[Shard]:
    """Cuts every ~shard_bytes, moved forward to the next line (jsonl) or blank line (text)."""
    size = os.path.getsize(path)
    separator = b"\n" if kind == "jsonl" else b"\n\n"
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + shard_bytes < size:
            fh.seek(cuts[-1] + shard_bytes)
            at = _next_after(fh, separator)
            if at is None or at >= size:
                break
            cuts.append(at)
    cuts.append(size)
    return [Shard(kind, (path,), a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _next_after(fh, separator: bytes) -> int | None:
    """The offset just past the next `separator` (and any newlines following it) from here."""
    base, carry = fh.tell(), b""
    while True:
        block = fh.read(1 << 16)
        if not block:
            return None
        data = carry + block
        at = data.find(separator)
        if at >= 0:
            end = at + len(separator)
            while end < len(data) and data[end:end + 1] == b"\n":
                end += 1
            return base - len(carry) + end
        carry = data[-(len(separator) - 1):] if len(separator) > 1 else b""
        base += len(block)


def _parquet_shards(path: str, shard_bytes: int) -> list[Shard]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise JaxftError(f"{path}: cannot read as parquet: {first_line(e)}") from e
    shards, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= shard_bytes:
            shards.append(Shard("parquet", (path,), start, g + 1))
            start, size = g + 1, 0
    if start < meta.num_row_groups or not shards:
        shards.append(Shard("parquet", (path,), start, meta.num_row_groups))
    return shards


def hub_shards(name: str) -> list[Shard]:
    """A hub dataset's train split, streamed (nothing is downloaded whole): one shard per data
    file, as `datasets` splits it (`IterableDataset.shard`)."""
    import datasets

    try:
        count = datasets.load_dataset(name, split="train", streaming=True).num_shards
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise JaxftError(f"'{name}' is not a local corpus and could not be streamed from the "
                         f"Hugging Face hub ({first_line(e)[:200]})") from e
    return [Shard("hub", (name,), i, count) for i in range(count)]


class BadShard(Exception):
    """A shard, or a row of it, that cannot be read; the message names the file (and line)."""


def read_documents(shard: Shard, *, text_column: str, skip: bool) -> tuple[list[str], int, str]:
    """The documents of `shard` in order, the count of malformed rows skipped (with `skip`),
    and where the first of them is. A malformed row without `skip` raises BadShard naming it."""
    reader = {"jsonl": _jsonl, "jsonl.gz": _jsonl, "parquet": _parquet,
              "paragraphs": _paragraphs, "files": _files, "hub": _hub}[shard.kind]
    return reader(shard, text_column, skip)


def _jsonl(shard: Shard, column: str, skip: bool) -> tuple[list[str], int, str]:
    (path,) = shard.files
    try:
        if shard.kind == "jsonl.gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            with open(path, "rb") as fh:
                fh.seek(shard.start)
                data = fh.read(shard.stop - shard.start)
    except (OSError, EOFError, zlib.error) as e:  # (gzip.BadGzipFile is an OSError)
        raise BadShard(f"{path}: cannot read ({first_line(e)})") from e
    texts, bad, first_bad = [], 0, ""
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)[column]
            problem = None if isinstance(value, str) else f"'{column}' is not a string"
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            problem = f"malformed JSON ({first_line(e)})"
        except (KeyError, TypeError):
            problem = f"no '{column}' field"
        if problem is None:
            texts.append(value)
            continue
        where = f"{path} line {_line_number(shard, data, n)}: {problem}"
        if not skip:
            raise BadShard(where)
        bad, first_bad = bad + 1, first_bad or where
    return texts, bad, first_bad


def _line_number(shard: Shard, data: bytes, n: int) -> int:
    """The file's line number of the shard's n-th line (counted only when a line is named)."""
    if shard.kind != "jsonl" or shard.start == 0:
        return n
    with open(shard.files[0], "rb") as fh:
        before = fh.read(shard.start).count(b"\n")
    return before + n


def _parquet(shard: Shard, column: str, skip: bool) -> tuple[list[str], int, str]:
    import pyarrow.parquet as pq

    (path,) = shard.files
    try:
        table = pq.ParquetFile(path).read_row_groups(range(shard.start, shard.stop),
                                                      columns=[column])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BadShard(f"{path}: cannot read column '{column}' as parquet "
                       f"({first_line(e)})") from e
    values = table.column(column).to_pylist()
    texts = [v for v in values if isinstance(v, str)]
    bad = len(values) - len(texts)
    if bad and not skip:
        raise BadShard(f"{path}: {bad} rows of '{column}' are not strings")
    return texts, bad, f"{path}: rows of '{column}' that are not strings" if bad else ""


def _hub(shard: Shard, column: str, skip: bool) -> tuple[list[str], int, str]:
    import datasets

    (name,) = shard.files
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True).shard(
            num_shards=shard.stop, index=shard.start)
        values = [row.get(column) for row in rows]
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise BadShard(f"{name} shard {shard.start} of {shard.stop}: cannot stream "
                       f"({first_line(e)[:200]})") from e
    texts = [v for v in values if isinstance(v, str)]
    bad = len(values) - len(texts)
    where = f"{name} shard {shard.start}: {bad} rows without a string '{column}'"
    if bad and not skip:
        raise BadShard(where)
    return texts, bad, where if bad else ""


def _paragraphs(shard: Shard, column: str, skip: bool) -> tuple[list[str], int, str]:
    (path,) = shard.files
    with open(path, "rb") as fh:
        fh.seek(shard.start)
        data = fh.read(shard.stop - shard.start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadShard(f"{path}: not UTF-8 text (byte {shard.start + e.start + 1})") from e
    return [p for p in text.split("\n\n") if p.strip()], 0, ""


def _files(shard: Shard, column: str, skip: bool) -> tuple[list[str], int, str]:
    texts, bad, first_bad = [], 0, ""
    for path in shard.files:
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"{path}: not UTF-8 text (byte {e.start + 1})"
            if not skip:
                raise BadShard(where) from e
            bad, first_bad = bad + 1, first_bad or where
            continue
        if text.strip():
            texts.append(text)
    return texts, bad, first_bad
