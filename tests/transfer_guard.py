"""JAX's device-to-host transfer guard, made to fire on the CPU as it fires on an accelerator.

On a CPU backend an array already lives in host memory, so reading it is no transfer and JAX's
guard (`jax.transfer_guard_device_to_host`) never refuses it. For a test that a loop never reads
device values where it promises not to, `enforce_on_cpu` checks the guard on every read of a
`jax.Array`'s value: implicit ones (`bool()`, `float()`, `np.asarray()`, `.item()`) are refused
under "disallow", explicit ones (`jax.device_get`) too under "disallow_explicit", as JAX does
on a GPU or TPU. It also counts every read (`Reads.count`), guard or not.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp

IMPLICIT_READS = ("__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                  "item", "tolist")
_explicit = threading.local()


class TransferRefused(RuntimeError):
    """What the emulated guard raises."""


class Reads:
    """How many device-to-host reads have happened since `enforce_on_cpu`."""

    count = 0


def _level() -> str | None:
    return jax.config.jax_transfer_guard_device_to_host


def enforce_on_cpu(monkeypatch) -> Reads:
    array_type = type(jnp.zeros(()))
    reads = Reads()

    def guard(name: str) -> None:
        original = getattr(array_type, name)

        def guarded(self, *args, **kwargs):
            reads.count += 1
            level = _level()
            if level == "disallow_explicit" or (level == "disallow" and
                                                 not getattr(_explicit, "active", False)):
                raise TransferRefused(f"device-to-host read ({name}) under transfer guard "
                                      f"{level!r}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(array_type, name, guarded)

    for name in IMPLICIT_READS:
        guard(name)
    device_get = jax.device_get

    def explicit_device_get(tree):
        if _level() == "disallow_explicit":
            raise TransferRefused("jax.device_get under transfer guard 'disallow_explicit'")
        _explicit.active = True
        try:
            return device_get(tree)
        finally:
            _explicit.active = False

    monkeypatch.setattr(jax, "device_get", explicit_device_get)
    return reads
