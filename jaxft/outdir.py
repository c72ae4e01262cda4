"""Directories jaxft writes into: checked before any work is done, emptied only of what jaxft wrote.

A training run's workdir and an export's output directory are both checked up front (a path that
is a file, lies under a file, or cannot be written is refused in one line before minutes of
loading and compiling), and neither is ever deleted wholesale: a workdir carries a marker file
from the run that made it, and wiping one removes only the entries jaxft writes there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax

from jaxft.errors import JaxftError, first_line

# Every file an export writes, of either kind: overwriting removes them all, so a directory never
# holds a stale adapter beside a model (transformers would load the wrong one) or a stale shard
# index beside a single-file model.
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json",
                "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
# The workdir marker, and what a run writes beside it (all that `wipe_workdir` removes).
WORKDIR_MARKER = ".jaxft-workdir"
WORKDIR_ENTRIES = ("checkpoints", "best_checkpoint", "damaged_checkpoints", "tensorboard",
                   "config.json", "label_map.json", "metrics.jsonl", "metrics.png",
                   "final_metrics.json", "wandb", "wandb_run.json")


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


def prepare_workdir(workdir: Path) -> None:
    """Check a training workdir before anything is loaded: it, and every directory and file a
    run writes in it that exists already (a resumed run's), must be writable and of the right
    kind. Nothing is written."""
    check_directory(workdir, "workdir")
    for name in WORKDIR_ENTRIES:
        entry = workdir / name
        if name in ("checkpoints", "best_checkpoint", "damaged_checkpoints", "tensorboard",
                    "wandb"):
            if entry.exists() and not entry.is_dir():
                raise JaxftError(f"{entry}: exists and is not a directory (move it out of the "
                                 "workdir)")
            if entry.is_dir():
                check_directory(entry, "workdir's directory")
        elif entry.is_dir():
            raise JaxftError(f"{entry}: is a directory, where the run writes a file")
        elif entry.exists():
            try:
                with entry.open("a"):  # opened to append, not changed
                    pass
            except OSError as e:
                raise JaxftError(f"{entry}: workdir's file is not writable: {first_line(e)}"
                                 ) from e


def claim_workdir(workdir: Path) -> None:
    """Create the workdir (if needed) and mark it as a jaxft run's; process 0 only."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / WORKDIR_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def wipe_workdir(workdir: Path) -> None:
    """`checkpoint.resume=fresh`: remove what earlier runs wrote to `workdir`, and nothing else.

    Only a directory with jaxft's marker is touched, and in it only the entries jaxft writes: a
    workdir pointed at `.` or at a directory of other files loses nothing that was not jaxft's.
    Process 0 deletes; every process waits until it has.
    """
    if workdir.exists() and not (workdir / WORKDIR_MARKER).is_file():
        if any(workdir.iterdir()):
            raise JaxftError(f"{workdir}: checkpoint.resume=fresh deletes only a workdir a jaxft "
                             f"run made, and this one has no {WORKDIR_MARKER} marker; delete "
                             "it yourself or choose another workdir")
    elif workdir.exists() and jax.process_index() == 0:
        for name in WORKDIR_ENTRIES:
            entry = workdir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxft_wipe_workdir")
