"""Orbax checkpoints that survive kill -9, preemption and a changed mesh, and are never discarded
for the wrong reason.

A checkpoint holds what training cannot recompute: the trainable parameters (in LoRA mode the
adapters only, never the frozen base), the optimizer state, and a JSON record with the data
iterator position and a fingerprint of what the run trains (step keys derive from the seed and
step number, so there is no RNG state). Orbax writes each step to a temporary directory and
renames it when complete, so a kill during a save leaves the previous checkpoint intact.

Once a save is complete, a manifest of its files and their sizes is written beside them. A
checkpoint that later fails to restore is moved aside (to `damaged_checkpoints/`, kept for
inspection) only when its files prove it damaged: one is missing or has changed size since the
save. Any other failure (a config whose fingerprint differs, a permission or I/O error, a
structure the fingerprint did not foresee) is refused in one line and nothing is moved, so a run
never restarts from scratch while a checkpoint it could resume from exists. Arrays restore onto
whatever shardings the new run asks for, so the mesh may change.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxft.config import LATER_LORA_FIELDS, base_config
from jaxft.errors import JaxftError, first_line
from jaxft.spec import RunSpec

ITEMS = ("state", "meta")
MANIFEST_NAME = "jaxft_manifest.json"


# What a checkpoint must agree with to be resumed, keyed by the config field (or part of the
# state) each entry records, from the run, its base checkpoint's path and its placed state.
_FINGERPRINT: dict[str, Callable[[RunSpec, str, dict[str, Any]], Any]] = {
    "model.path": lambda run, path, placed: path,
    "task": lambda run, path, placed: run.task,
    "lora": lambda run, path, placed: (None if run.lora is None
                                       else _lora_fingerprint(run.config)),
    "train.param_dtype": lambda run, path, placed: run.train.param_dtype,
    "train.optimizer_state_dtype": lambda run, path, placed: run.train.optimizer_state_dtype,
    # clipping changes optax's state tree
    "optim.clip_norm": lambda run, path, placed: "on" if run.config.optim.clip_norm else "off",
    "optimizer state": lambda run, path, placed: layout(placed["opt_state"]),
    "trainable parameters": lambda run, path, placed: layout(placed["trainable"]),
    # preference tuning's loss and reference: another β is another objective
    "dpo": lambda run, path, placed: None if run.dpo is None else {
        "beta": run.dpo.beta, "loss_type": run.dpo.loss_type,
        "label_smoothing": run.dpo.label_smoothing, "reference": run.reference},
}
FINGERPRINT_FIELDS = tuple(_FINGERPRINT)
# Fields checkpoints did not always record, and the value that stands for their absence.
LATER_FIELDS = {"dpo": None}


def fingerprint(run: RunSpec, model_path: str, placed: dict[str, Any]) -> dict[str, Any]:
    """A run's fingerprint (`FINGERPRINT_FIELDS`), as it reads back from a checkpoint."""
    found = {field: entry(run, model_path, placed) for field, entry in _FINGERPRINT.items()}
    return json.loads(json.dumps(found))


def _lora_fingerprint(c) -> dict[str, Any]:
    """The LoRA section, less the fields added since checkpoints were first written while they
    are at their defaults, so a run saved before those fields existed still resumes."""
    defaults = base_config().lora
    return {k: v for k, v in c.lora.to_dict().items()
            if not (k in LATER_LORA_FIELDS and v == defaults[k])}


def manager(directory: Path, *, keep: int | None = None, create: bool = False,
            asynchronous: bool = False) -> ocp.CheckpointManager:
    """The Orbax manager of a run's checkpoint directory: for training (`create`, `keep`,
    asynchronous saves) or for reading one back (export, evaluation, generation). The path is
    made absolute, since Orbax refuses to restore from a relative one (`--workdir=runs/x`)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


class Checkpoints:
    """Save every `every` steps (asynchronously), keep the newest `keep`, restore the latest."""

    def __init__(self, directory: str | Path, *, keep: int, fingerprint: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        self.manager = manager(self.directory, keep=keep, create=True, asynchronous=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start an asynchronous save; training continues while it is written."""
        self._write_manifests()  # the previous save is done (Orbax waits for it anyway)
        meta = {**meta, "step": step, "fingerprint": self.fingerprint}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def replace(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """`save`, first removing a checkpoint of the same step (a resumed run re-deciding a
        step it had already saved, bitwise the same): with `keep=1`, the one slot of the best
        checkpoint. The older checkpoint goes only once the new one is committed."""
        if step in self.steps():
            self.wait()
            self.manager.delete(step)
        self.save(step, state, meta)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the target shardings.
        A checkpoint of a different run (any fingerprint field) is refused, a damaged one moved
        aside (then the one before it is tried), and any other failure refused.
        """
        for step in reversed(self.steps()):
            path = self.directory / str(step)
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as e:
                self._damaged_or_refuse(step, "its record does not load", e)
                continue
            self._check_fingerprint(meta.get("fingerprint", {}), path)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:
                self._damaged_or_refuse(step, "its state does not restore", e)
                continue
            return step, restored.state, meta
        return None

    def _damaged_or_refuse(self, step: int, what: str, error: Exception) -> None:
        """Move a checkpoint aside if its files prove it damaged; otherwise refuse."""
        path = self.directory / str(step)
        damage = damage_of(path)
        if damage is None:
            raise JaxftError(
                f"{path}: {what} ({first_line(error)}), but its files are as they were saved, so "
                "it is not damaged and nothing was moved; check the disk and permissions, or "
                "move it out of the way yourself to resume from an older checkpoint")
        logging.warning("skipping checkpoint %s: %s (%s): %s", path, what, first_line(error),
                        damage)
        self._set_aside(step)

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
        for field in self.fingerprint:
            if (field not in saved and field in LATER_FIELDS
                    and self.fingerprint[field] == LATER_FIELDS[field]):
                continue  # recorded only since; absent, it meant what this run means
            if field not in saved:
                raise JaxftError(
                    f"{path}: checkpoint was written by an older jaxft, which did not record "
                    f"its {field}; use another workdir or --config.checkpoint.resume=fresh")
            if saved[field] != self.fingerprint.get(field):
                raise JaxftError(
                    f"{path}: checkpoint was written by a run with a different {field} "
                    f"({_short(saved[field])} vs now {_short(self.fingerprint.get(field))}); "
                    "use another workdir or --config.checkpoint.resume=fresh")

    def _write_manifests(self) -> None:
        """Record the files of every completed save that has no manifest yet (process 0)."""
        self.manager.wait_until_finished()
        if jax.process_index() != 0:
            return
        for step in self.steps():
            path = self.directory / str(step)
            if not (path / MANIFEST_NAME).exists():
                temporary = path / (MANIFEST_NAME + ".tmp")
                temporary.write_text(json.dumps(_files(path), indent=0, sort_keys=True) + "\n")
                temporary.replace(path / MANIFEST_NAME)

    def wait(self) -> None:
        """Block until every pending save is on disk (and recorded in its manifest)."""
        self._write_manifests()

    def close(self) -> None:
        self._write_manifests()
        self.manager.close()


def damage_of(path: Path) -> str | None:
    """What proves a checkpoint damaged (a file missing, or changed in size, since its save), or
    None: intact, or not provable (a checkpoint saved without a manifest)."""
    try:
        recorded = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        return f"its manifest does not read ({first_line(e)})"
    found = _files(path)
    for name, size in sorted(recorded.items()):
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, {size} when saved"
    return None


def _files(path: Path) -> dict[str, int]:
    """{relative file name: size} of a checkpoint directory, its manifest aside."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.startswith(MANIFEST_NAME)}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, as the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def layout(tree: Any) -> list[str]:
    """`path shape dtype` of every array of a tree: its structure, for a fingerprint."""
    return [f"{jax.tree_util.keystr(path)} {list(x.shape)} {x.dtype}"
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
