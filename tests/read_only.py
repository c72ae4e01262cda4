"""Directories nothing may be created in, as a user meets them: permission bits for an ordinary
user; for root (whom permission bits do not stop) the immutable attribute, where the filesystem
and the container allow setting it. Tests skip where neither can be had."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(path: Path, *, recursive: bool = False) -> Iterator[Path]:
    """`path` (a directory, and with `recursive` everything in it) made read-only for the
    duration, then restored."""
    if os.geteuid() != 0:
        entries = [path, *path.rglob("*")] if recursive else [path]
        modes = {p: p.stat().st_mode for p in entries}
        for p in reversed(entries):
            p.chmod(stat.S_IRUSR | (stat.S_IXUSR if p.is_dir() else 0))
        try:
            yield path
        finally:
            for p in entries:
                p.chmod(modes[p])
        return
    flag = ["-R"] if recursive else []
    try:
        done = subprocess.run(["chattr", *flag, "+i", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no chattr here to make a directory read-only as root")
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} read-only as root here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", *flag, "-i", str(path)], check=True)
