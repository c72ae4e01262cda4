"""Tokenizing worker processes fed shard jobs in a fixed order of need.

    pool = WorkerPool(settings_path, workers=2, jobs=[...])   # starts at once, in the background
    counts = pool.wait(7)        # shard 7's counts once its tokens are in the cache

Workers are plain subprocesses (`python -m jaxft.data.tokenize_worker`), not a multiprocessing
pool: the training process has JAX's threads running, which a fork must not copy, and a spawned
multiprocessing child would import the trainer's own module, JAX and all. Jobs go out in the
order given (the order training will read the shards), one at a time to whichever worker is
free, so the shard needed next is always the next to start and the first one is ready in the
time one worker takes to tokenize it. What training reads never depends on which worker
finished first: it waits for the shard it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence

from jaxft.errors import JaxftError


class WorkerPool:
    """`workers` subprocesses working through `jobs` (dicts with an 'index'), in order."""

    def __init__(self, settings_path: str, workers: int, jobs: Sequence[dict]):
        self._jobs = list(jobs)
        self._next = 0
        self._lock = threading.Lock()
        self._done: dict[int, dict] = {}
        self._events = {job["index"]: threading.Event() for job in self._jobs}
        env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self._procs = [subprocess.Popen(
            [sys.executable, "-m", "jaxft.data.tokenize_worker", settings_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
            for _ in range(max(1, min(workers, len(self._jobs))))]
        self._threads = [threading.Thread(target=self._feed, args=(p,), daemon=True)
                         for p in self._procs]
        for t in self._threads:
            t.start()

    def _feed(self, proc: subprocess.Popen) -> None:
        """Give `proc` the next job until none are left, recording each reply."""
        while True:
            with self._lock:
                if self._next >= len(self._jobs):
                    break
                job = self._jobs[self._next]
                self._next += 1
            try:
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                reply = json.loads(line) if line else None
            except (OSError, ValueError):
                reply = None
            dead = reply is None  # the worker died (killed, or out of memory)
            if dead:
                reply = {"index": job["index"], "kind": "crash",
                         "error": f"a tokenizing worker exited (code {proc.poll()}) on shard "
                                  f"{job['shard']['files'][0]}"}
            self._done[job["index"]] = reply
            self._events[job["index"]].set()
            if dead:
                break
        self._close(proc)

    @staticmethod
    def _close(proc: subprocess.Popen) -> None:
        try:
            proc.stdin.close()
        except OSError:
            pass

    def wait(self, index: int) -> dict:
        """The reply for job `index` once it is done ({'counts'} or {'error', 'kind'})."""
        event = self._events[index]
        while not event.wait(timeout=1.0):
            if not any(t.is_alive() for t in self._threads):  # nobody left to do it
                raise JaxftError("every tokenizing worker has stopped before shard "
                                 f"{index} was done")
        return self._done[index]

    def pending(self) -> int:
        return sum(not e.is_set() for e in self._events.values())

    def close(self) -> None:
        """Stop handing out jobs and end the workers (a shard in progress is abandoned: its
        temporary files are never read)."""
        with self._lock:
            self._next = len(self._jobs)
        for p in self._procs:
            self._close(p)
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
