"""Orbax checkpoints that survive kill -9, preemption and a changed mesh.

A checkpoint holds what training cannot recompute: the trainable parameters (in LoRA mode the
adapters only, never the frozen base), the optimizer state, and a JSON record with
the data iterator position and a fingerprint of what the run trains (step keys derive from the
seed and step number, so there is no RNG state). Orbax writes each step to
a temporary directory and renames it when complete, so a kill during a save leaves the previous
checkpoint intact; a latest checkpoint that still fails to restore is skipped with a warning.
Arrays restore onto whatever shardings the new run asks for, so the mesh may change.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxft.errors import JaxftError

# Fields of the fingerprint that must match for a checkpoint to be resumed.
FINGERPRINT_FIELDS = ("model", "task", "lora", "param_dtype", "optimizer_state_dtype",
                      "trainable_shapes")


class Checkpoints:
    """Save every `every` steps (asynchronously), keep the newest `keep`, restore the latest."""

    def __init__(self, directory: str | Path, *, keep: int, fingerprint: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an asynchronous save; training continues while it is written."""
        meta = {**meta, "step": step, "fingerprint": self.fingerprint}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the target shardings.
        A checkpoint of a different run (model, task, LoRA setup, shapes) is refused.
        """
        for step in reversed(self.steps()):
            path = self.directory / str(step)
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # unreadable record: a damaged checkpoint
                logging.warning("skipping checkpoint %s: its record does not load (%s)", path,
                                _first_line(e))
                self._set_aside(step)
                continue
            self._check_fingerprint(meta.get("fingerprint", {}), path)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:
                logging.warning("skipping checkpoint %s: it does not restore (%s)", path,
                                _first_line(e))
                self._set_aside(step)
                continue
            return step, restored.state, meta
        return None

    def _set_aside(self, step: int) -> None:
        """Move a damaged checkpoint out of the way (kept for inspection) so its step can be
        saved again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
            logging.warning("moved damaged checkpoint %s to %s", self.directory / str(step), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxft_set_aside_checkpoint")
        self.manager.reload()

    def _check_fingerprint(self, saved: dict[str, Any], path: Path) -> None:
        for field in FINGERPRINT_FIELDS:
            if saved.get(field) != self.fingerprint.get(field):
                raise JaxftError(
                    f"{path}: checkpoint was written by a run with a different {field} "
                    f"({_short(saved.get(field))} vs now {_short(self.fingerprint.get(field))}); "
                    "use another workdir or --config.checkpoint.resume=fresh")

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, as the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
