"""Stopping a run cleanly: SIGTERM (a preempted TPU VM, a cluster's grace period) and Ctrl-C
(SIGINT) become "save at the next step boundary, then stop", agreed on by every process of a
multi-host run. A second Ctrl-C aborts at once: what was saved before is kept, nothing more.
"""

from __future__ import annotations

import signal
import sys

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a program stopped by Ctrl-C


class Preemption:
    """Turns SIGTERM and a first Ctrl-C into "save at the next step boundary, then stop", from
    `__enter__` on; `__exit__` puts the previous handlers back."""

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the stop is a Ctrl-C's (exit 130), not a preemption's (0)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: no waiting
            self.interrupted = True
            print("\nCtrl-C: saving at the next step boundary, then stopping (Ctrl-C again "
                  "to abort at once)", file=sys.stderr, flush=True)
        self.requested = True

    def stopped(self, step: int, directory) -> str:
        """The last line of a run that stopped here: where it saved, how to go on."""
        if self.interrupted:
            return (f"stopped (Ctrl-C): saved step {step} to {directory}; run the same command "
                    "again to resume")
        return f"preempted: saved step {step} to {directory}; rerun to resume"

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
