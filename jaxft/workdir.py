"""Rebuild a training run from its workdir: export, evaluation and generation all start here.

`W/config.json` names the base checkpoint and the LoRA setup; a checkpoint in `W/checkpoints`
holds the trained weights. Only the `trainable` subtree is restored (an Orbax partial restore),
so the optimizer state is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxft import checkpoint, hf_io, hub, lora
from jaxft import config as config_lib
from jaxft.early_stopping import BEST_DIRECTORY
from jaxft.errors import JaxftError, first_line


@dataclasses.dataclass
class Run:
    """A training run rebuilt from its workdir: the model as it was at `step`."""

    model: nnx.Module
    lora: lora.LoraConfig | None
    config: ml_collections.ConfigDict  # the run's resolved config
    base: str  # the resolved base checkpoint: a local directory or .gguf file (and tokenizer)
    base_name: str  # what PyTorch users load: the hub id if the run named one, else `base`
    step: int


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a `jaxft.train` run wrote to `W/config.json`."""
    config_file = Path(workdir) / "config.json"
    if not config_file.is_file():
        raise JaxftError(f"{workdir}: no config.json (not a jaxft training workdir)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))


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
    lora_cfg = config_lib.lora_config(cfg)
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
    if cfg.task == "classification":  # the head size training settled on (0: none recorded)
        num_labels = cfg.model.get("num_labels") or None
    model = hf_io.load_model(cfg.model.resolved_path, dtype=dtype or cfg.train.param_dtype,
                             compute_dtype=config_lib.compute_dtype(cfg),
                             num_labels=num_labels, seed=cfg.train.seed, mesh=mesh,
                             quantize=config_lib.quant_config(cfg))
    if lora_cfg is not None:
        lora.apply_lora(model, lora_cfg, seed=cfg.train.seed)
    trainable = nnx.state(model, lora.trainable_filter(lora_cfg))
    restored = _restore_trainable(manager, step, trainable.to_pure_dict(), directory)
    nnx.replace_by_pure_dict(trainable, restored)
    nnx.update(model, trainable)
    return Run(model, lora_cfg, cfg, cfg.model.resolved_path, _base_name(cfg), step)


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
