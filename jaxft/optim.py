"""The optimizer: AdamW with warm-up and decay, clipping, a weight-decay mask, LoRA+.

It is built for the trainable partition only: the frozen base never reaches optax, so it holds
no optimizer state at all. Within the trainable partition `optax.multi_transform` gives LoRA's B
factors their own learning rate (LoRA+), and `optax.masked`-style decay masks keep norms and
biases undecayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxft.errors import JaxftError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(cfg: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine/linear decay to `lr * final_lr_ratio`."""
    warmup = min(cfg.warmup_steps, steps)
    decay_steps = max(steps - warmup, 1)
    end = cfg.lr * cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise JaxftError(f"optim.schedule {cfg.schedule!r} unknown (known: {', '.join(SCHEDULES)})")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _paths(state) -> object:
    """The same tree with each leaf replaced by its dotted path (`model.norm.weight`)."""

    def name(path) -> str:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return ".".join(k for k in keys if k not in ("value", "raw_value"))

    return jax.tree_util.tree_map_with_path(lambda path, _: name(path), state)


def _decays(path: str, x) -> bool:
    """Weight decay on matrices only: never biases or normalisation scales."""
    parts = path.split(".")
    owner = parts[-2].lower() if len(parts) > 1 else ""
    if parts[-1] == "bias" or "norm" in owner or owner.startswith("ln_"):
        return False
    return True


def make_optimizer(cfg: ml_collections.ConfigDict, trainable: nnx.State, steps: int, *,
                   state_dtype: str = "float32",
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW over the trainable partition; returns the transform and its LR schedule.

    `state_dtype` is the dtype AdamW's moments are stored in (`with_state_dtype`).
    """
    if cfg.lr <= 0:
        raise JaxftError(f"optim.lr must be positive, got {cfg.lr}")
    schedule = learning_rate(cfg, steps)
    paths = _paths(trainable)

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(lambda step: schedule(step) * scale, b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)

    def _decay_mask(params):
        # Stacked layers add a leading axis to every array, so the path, not ndim, says which
        # arrays are norms and biases.
        return jax.tree.map(_decays, _paths(params), params)

    labels = jax.tree.map(lambda p: "lora_b" if p.endswith("lora_b") else "rest", paths)
    parts = {"rest": adamw(1.0), "lora_b": adamw(cfg.loraplus_lr_ratio)}
    tx = optax.multi_transform(parts, labels)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return with_state_dtype(tx, state_dtype), schedule


def with_state_dtype(tx: optax.GradientTransformation,
                     dtype: str) -> optax.GradientTransformation:
    """`tx` with its floating-point state stored in `dtype` and updated in float32.

    optax keeps moments in the parameters' dtype (and `mu_dtype` covers only the first), so
    bfloat16 weights would otherwise get bfloat16 moments and float32 weights could never get
    smaller ones. Here the storage dtype is a choice of its own: float32 by default, bfloat16 to
    halve the optimizer's memory; the arithmetic of each update is float32 either way.
    """
    store = jnp.dtype(dtype)

    def cast(tree, to):
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(params), store)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, store)

    return optax.GradientTransformation(init, update)


