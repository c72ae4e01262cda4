"""Directories jaxft writes into: checked before any work is done, emptied only of what jaxft wrote.

An export's output directory (and, through `check_directory`, a training run's workdir, whose
lifecycle is `jaxft.workdir`'s) is checked up front: a path that is a file, lies under a file,
or cannot be written is refused in one line before minutes of loading and compiling. Nothing is
ever deleted wholesale: overwriting an export removes only the files an export writes. A single
output file (`check_output_file`) is refused as early when it exists (unless overwriting) or its
directory does not, and is written whole or not at all (`whole_file`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxft.errors import JaxftError, first_line

# Every file an export writes, of either kind: overwriting removes them all, so a directory never
# holds a stale adapter beside a model (transformers would load the wrong one) or a stale shard
# index beside a single-file model.
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json",
                "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
def check_directory(path: Path, what: str) -> None:
    """Refuse, in one line, a `path` that cannot serve as a directory jaxft writes into.

    It may not exist yet (then it must be creatable: no file on the way); if it exists it must
    be a directory this process can create files in, which is tried rather than inferred from
    permission bits (root ignores them; read-only mounts and immutable files do not).
    """
    if path.exists() and not path.is_dir():
        raise JaxftError(f"{path}: {what} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise JaxftError(f"{path}: {what} cannot be created: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".jaxft-probe-"):
            pass
    except OSError as e:
        where = "" if existing == path else f" (in {existing}, where it would be created)"
        raise JaxftError(f"{path}: {what} is not writable{where}: {first_line(e)}") from e


def check_output(out: str | os.PathLike, *, overwrite: bool,
                 what: str = "output directory") -> Path:
    """Refuse an export's output directory that is unusable, or not empty unless overwriting;
    changes nothing (call it before loading anything)."""
    out = Path(out)
    check_directory(out, what)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise JaxftError(f"{out}: {what} exists and is not empty (pass --overwrite, or "
                         "overwrite=True, to replace its export)")
    return out


def prepare(out: str | os.PathLike, *, overwrite: bool, replaces: tuple[str, ...] = EXPORT_FILES,
            what: str = "output directory") -> Path:
    """An export's output directory, checked (`check_output`) and created.

    With `overwrite`, the files a previous export wrote there (`replaces`, glob patterns) are
    removed first, and anything else in the directory is left alone. Only process 0 changes
    anything on disk; every process gets the same refusals.
    """
    out = check_output(out, overwrite=overwrite, what=what)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in replaces if overwrite else ():
            for stale in out.glob(pattern):
                stale.unlink()
    return out


def check_output_file(out: str | os.PathLike, *, overwrite: bool, what: str) -> Path:
    """Refuse, in one line, a file to write that exists (unless `overwrite`), is a directory,
    or whose directory is missing or not writable; changes nothing, so call it before minutes
    of loading. A missing directory is not created: a typo in it would scatter new ones."""
    out = Path(out)
    if out.is_dir():
        raise JaxftError(f"{out}: is a directory (expected the path of the {what} to write)")
    if out.exists() and not overwrite:
        raise JaxftError(f"{out}: exists (pass --overwrite, or overwrite=True, to replace it)")
    if not out.parent.exists():
        raise JaxftError(f"{out}: directory {out.parent} does not exist")
    check_directory(out.parent, f"the {what}'s directory")
    return out


@contextlib.contextmanager
def whole_file(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` to write, renamed onto `out` when the block ends (and
    removed if it fails): no reader, and no later run, ever finds half a file, and a file being
    replaced stays whole until the new one is."""
    temporary = out.with_name(f".{out.name}.partial")
    try:
        yield temporary
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            temporary.unlink()


def readable_by_all(file: Path) -> None:
    """Give a written file the permissions any new file gets here (0644 under the usual umask):
    the safetensors writer creates its files readable by their owner alone."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(file, 0o666 & ~mask)
