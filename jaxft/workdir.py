"""A training run's workdir: checked, claimed and wiped by `jaxft.train`, and rebuilt from by
export, evaluation and generation.

Before anything loads, a run checks its workdir (`prepare_workdir`) and claims it with a marker
file (`claim_workdir`) only once the run is known to be compatible with what is there; wiping
one (`checkpoint.resume=fresh`) removes only what jaxft wrote, and only where the marker is.

`W/config.json` names the base checkpoint and the LoRA setup; a checkpoint in `W/checkpoints`
holds the trained weights. `load_run` restores only the `trainable` subtree (an Orbax partial
restore), so the optimizer state is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxft import checkpoint, lora, spec, tasks
from jaxft.data import labels
from jaxft.early_stopping import BEST_DIRECTORY
from jaxft.errors import JaxftError, first_line
from jaxft.hf import hub, weights
from jaxft.outdir import check_directory

# The workdir marker, and what a run writes beside it (all that `wipe_workdir` removes).
WORKDIR_MARKER = ".jaxft-workdir"
LABEL_MAP = "label_map.json"  # a classifier's {name: id}, written when its run starts
WORKDIR_ENTRIES = ("checkpoints", "best_checkpoint", "damaged_checkpoints", "tensorboard",
                   "config.json", LABEL_MAP, "metrics.jsonl", "metrics.png",
                   "final_metrics.json", "wandb", "wandb_run.json")


@dataclasses.dataclass
class Run:
    """A training run rebuilt from its workdir: the model as it was at `step`."""

    model: nnx.Module
    spec: spec.RunSpec  # the run's, resolved from its config.json
    base: str  # the resolved base checkpoint: a local directory or .gguf file
    base_name: str  # what PyTorch users load: the hub id if the run named one, else `base`
    step: int
    label_map: dict[str, int] | None = None  # a classifier's: what its class ids are called
    tokenizer: str = ""  # where its tokenizer loads from ("": `base`)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base

    @property
    def lora(self) -> lora.LoraConfig | None:
        return self.spec.lora

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.spec.config


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a `jaxft.train` run wrote to `W/config.json`."""
    config_file = Path(workdir) / "config.json"
    if not config_file.is_file():
        raise JaxftError(f"{workdir}: no config.json (not a jaxft training workdir)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))


def read_label_map(workdir: str | os.PathLike) -> dict[str, int] | None:
    """The label map a classification run saved (`W/label_map.json`): the ids its head
    predicts and the names the data gave them, which only the run knows (new data may lack a
    class, or have no labels at all). None when the run saved none."""
    path = Path(workdir) / LABEL_MAP
    return labels.load_label_map(path) if path.is_file() else None


BEST = "best"


def parse_step(value: str | int | None) -> int | str | None:
    """A `--step` value: a checkpointed step number, 'best' (early stopping's best eval), or
    None for the newest."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or value == BEST:
        return value
    try:
        return int(value)
    except ValueError:
        raise JaxftError(f"--step {value!r} is not a step number or 'best'") from None


def load_run(workdir: str | os.PathLike, step: int | str | None = None, *,
             dtype: str | None = None, mesh: Mesh | None = None) -> Run:
    """The run's model at a checkpointed step (default: the newest; 'best': early stopping's
    best eval), in the run's compute dtype; `dtype` overrides the run's parameter dtype, and
    with a `mesh` the base weights go straight onto their shardings as they load."""
    workdir = Path(workdir)
    cfg = read_run_config(workdir)
    run = spec.of_saved_run(cfg)
    step = parse_step(step)
    directory = workdir / (BEST_DIRECTORY if step == BEST else "checkpoints")
    manager = checkpoint.manager(directory) if directory.is_dir() else None
    steps = sorted(manager.all_steps()) if manager else []
    if not steps and step == BEST:
        raise JaxftError(f"{workdir}: no best checkpoint in {directory} (it is kept by runs "
                         "with train.early_stopping.enabled, from their first eval on)")
    if not steps:
        raise JaxftError(f"{workdir}: no checkpoint in {directory} (train first, or wait for "
                         "the first save)")
    if step is None or step == BEST:
        step = steps[-1]
    elif step not in steps:
        raise JaxftError(f"{workdir}: no checkpoint for step {step} (saved steps: "
                         f"{', '.join(map(str, steps))})")
    num_labels = None
    if run.task == tasks.CLASSIFICATION:  # the head size training settled on (0: none recorded)
        num_labels = cfg.model.get("num_labels") or None
    model = weights.load_hf_model(cfg.model.resolved_path,
                                  run.model_options(num_labels, param_dtype=dtype), mesh=mesh)
    if run.lora is not None:
        lora.apply_lora(model, run.lora, seed=run.train.seed)
    trainable = nnx.state(model, lora.trainable_filter(run.lora))
    restored = _restore_trainable(manager, step, trainable.to_pure_dict(), directory)
    nnx.replace_by_pure_dict(trainable, restored)
    nnx.update(model, trainable)
    label_map = read_label_map(workdir) if run.task == tasks.CLASSIFICATION else None
    return Run(model, run, cfg.model.resolved_path, _base_name(cfg), step, label_map,
               saved_tokenizer_path(cfg))


def saved_tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    """Where a saved run's tokenizer loads from (runs saved before `model.tokenizer` existed
    load it from their base)."""
    return cfg.model.get("resolved_tokenizer") or cfg.model.resolved_path


def _base_name(cfg: ml_collections.ConfigDict) -> str:
    """A hub id stays a hub id (a shared adapter names it), not this machine's cache path."""
    given = str(cfg.model.path)
    return cfg.model.resolved_path if hub.looks_local(given) else given


def _restore_trainable(manager: ocp.CheckpointManager, step: int, target: dict,
                       directory: Path) -> dict:
    """Only the trained parameters of a checkpoint: the optimizer state is never read."""
    abstract = checkpoint.abstract_like(target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"trainable": abstract}, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args({"trainable": abstract}))))
    except Exception as e:  # a damaged checkpoint, or one from a different setup
        raise JaxftError(f"{directory / str(step)}: does not restore into this run's model "
                         f"({first_line(e)})") from e
    return restored.state["trainable"]


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
