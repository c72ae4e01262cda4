"""Stopping a run cleanly: SIGTERM (a preempted TPU VM, a cluster's grace period) becomes "save
at the next step boundary, then exit 0", agreed on by every process of a multi-host run.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class Preemption:
    """Turns SIGTERM into "save at the next step boundary, then exit 0", from `__enter__` on;
    `__exit__` puts the previous handler back."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any was asked to stop (a collective with several)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def at_step(self, step: int, reading: bool) -> bool:
        """Whether to save and stop after `step`. With several processes, JAX's preemption
        sync point (set by the coordination service, no device work) is asked every step, and
        our own flag is gathered only at steps that read from the devices anyway."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step) or (reading and
                                                                       self.agreed())
