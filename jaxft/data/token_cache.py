"""The tokenized corpus on disk: one set of files per shard, written once, memory-mapped after.

    <cache_dir>/<settings key>/tokenizer.json            the tokenizer the tokens came from
    <cache_dir>/<settings key>/<shard key>.tokens.npy    uint16 (vocabulary <= 65,536) or uint32
    <cache_dir>/<settings key>/<shard key>.offsets.npy   int64 [documents + 1] into the tokens
    <cache_dir>/<settings key>/<shard key>.json          counts; written last: the shard is done

The settings key hashes what every shard's tokens depend on (the tokenizer's full JSON, the text
column, what a document is, the prefix and EOS added around it); a shard key adds the shard's
files (path, size, modification time) and range, and for the shard the eval set is held out of,
the hold-out. A cache built by another tokenizer or with other settings therefore lives under
another key and is never read; a corpus that grows re-tokenizes only its new shards.

Every file is written under a temporary name and renamed into place, the counts last, so a
shard is either whole or absent: a run killed or out of disk space mid-shard leaves nothing a
later run would read (its temporary files are removed, or ignored and overwritten).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np

VERSION = 1  # bump when the layout or the meaning of the tokens changes
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NoRoom(Exception):
    """The disk (or a file-size limit) refused the cache's bytes; the message says where."""


def default_dir() -> Path:
    """`$JAXFT_CACHE`, else `$XDG_CACHE_HOME/jaxft/tokenized` (`~/.cache/jaxft/tokenized`)."""
    if os.environ.get("JAXFT_CACHE"):
        return Path(os.environ["JAXFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxft" / "tokenized"


def key(value: object) -> str:
    """A short stable hash of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class ShardTokens:
    """One shard's documents, memory-mapped: document d is tokens[offsets[d]:offsets[d + 1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def paths(directory: Path, shard_key: str, part: str = "") -> dict[str, Path]:
    stem = shard_key + (f".{part}" if part else "")
    return {"tokens": directory / f"{stem}.tokens.npy",
            "offsets": directory / f"{stem}.offsets.npy",
            "counts": directory / f"{shard_key}.json"}


def read_counts(directory: Path, shard_key: str) -> dict | None:
    """The finished shard's counts, or None when it is not (wholly) in the cache."""
    try:
        counts = json.loads(paths(directory, shard_key)["counts"].read_text())
    except (OSError, ValueError):
        return None
    return counts if counts.get("version") == VERSION else None


def open_shard(directory: Path, shard_key: str, part: str = "") -> ShardTokens:
    """A finished shard's documents (`part` 'eval': its held-out ones), memory-mapped: pages
    are read as rows need them and dropped with the arrays."""
    p = paths(directory, shard_key, part)
    return ShardTokens(np.load(p["tokens"], mmap_mode="r"), np.load(p["offsets"], mmap_mode="r"))


def write_shard(directory: Path, shard_key: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
                counts: dict) -> None:
    """Write each part ('' and maybe 'eval') as tokens + offsets, then the counts; NoRoom when
    the disk is full, with every file of this shard removed again."""
    written: list[Path] = []
    try:
        for part, (tokens, offsets) in parts.items():
            p = paths(directory, shard_key, part)
            for name, array in (("tokens", tokens), ("offsets", offsets)):
                _atomic(p[name], written, lambda fh, a=array: _save_npy(fh, a))
        data = json.dumps({**counts, "version": VERSION}).encode()
        _atomic(paths(directory, shard_key)["counts"], written, lambda fh: fh.write(data))
    except OSError as e:
        for f in written:
            f.unlink(missing_ok=True)
        if e.errno in NO_ROOM:
            raise NoRoom(f"{directory}: no room to write the tokenized corpus "
                         f"({os.strerror(e.errno)}); free space or set data.cache_dir to "
                         "another disk") from e
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (another process's worker) never sees it half
    written."""
    _atomic(path, [], lambda fh: fh.write(data))


def _save_npy(fh, array: np.ndarray) -> None:
    """np.save's format, written by Python's own file object: numpy's `tofile` reports a full
    disk as a short write without an errno, this says ENOSPC (or EFBIG) as the OS did."""
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
    fh.write(memoryview(array).cast("B"))


def _atomic(path: Path, written: list[Path], write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    written.append(tmp)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    written[-1] = path
