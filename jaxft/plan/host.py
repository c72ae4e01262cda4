"""What the machine the dry run runs on lets a program use, for its verdict without --topology.

A CPU's devices (one, or several with `--xla_force_host_platform_device_count`) all live in the
host's RAM, so each gets an equal share of it: the smaller of the physical memory and a cgroup
limit (a container's), since a process over the limit is killed however much RAM the host has.
A local GPU or TPU reports its own limit (`memory_stats()["bytes_limit"]`: what JAX's allocator
may take, already net of XLA_PYTHON_CLIENT_MEM_FRACTION).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
                 Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))  # cgroup v1


def usable_bytes(devices: Sequence[Any]) -> tuple[int | None, str]:
    """Memory one device may use, and how that was arrived at (None: not known here)."""
    device = devices[0]
    if device.platform == "cpu":
        ram, source = host_memory()
        if ram is None:
            return None, ""
        shared = f", shared by its {len(devices)} CPU devices" if len(devices) > 1 else ""
        return ram // len(devices), f"{source}{shared}"
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001  (a backend without memory statistics)
        limit = None
    if not limit:
        return None, ""
    return int(limit), "what JAX's allocator may take on this device (memory_stats)"


def host_memory() -> tuple[int | None, str]:
    """This host's RAM in bytes, bounded by a cgroup limit, and a phrase naming which."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        return None, ""
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < physical:
            return int(text), f"this container's memory limit ({path})"
    return physical, "this host's RAM"
