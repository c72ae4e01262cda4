"""The train and eval steps: pure functions of pytrees, for full and LoRA fine-tuning alike.

The model arrives split: `trainable` (everything in full fine-tuning, the adapters in LoRA),
`frozen` (the rest) and `dropout` (LoRA dropout keys, rewritten each step). Gradients are taken
with respect to `trainable` only. A batch of `accum_steps` micro-batches is scanned, summing
token losses and gradients, then normalised once by the token count, so accumulation computes
exactly what one big batch would. `jaxft.train` jits these with explicit shardings.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.kernels.cross_entropy import head_cross_entropy

Batch = dict[str, jax.Array]
TASKS = ("lm", "classification")


def lm_losses(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy over `loss_mask`, and the token count.

    When the model's output head is one plain matrix (`output_head()`), the head and the loss
    run fused, a chunk of positions at a time (`head_cross_entropy`): the [B, T, V] float32
    logits are never held at once. Otherwise the full logits are computed and reduced.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    head = getattr(model, "output_head", lambda: None)()
    if head is not None:
        h = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                  positions=batch["positions"], return_hidden=True)  # B T D
        loss_sum = head_cross_entropy(h, head, batch["targets"], mask)
        return {"loss_sum": loss_sum, "count": jnp.sum(mask)}
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                   positions=batch["positions"])  # B T V
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # B T
    return {"loss_sum": jnp.sum(nll * mask), "count": jnp.sum(mask)}


def classification_losses(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Summed cross-entropy and correct predictions over valid rows."""
    logits = model(batch["input_ids"], batch["attention_mask"],
                   batch.get("token_type_ids")).astype(jnp.float32)  # B C
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)[:, 0]
    valid = batch.get("valid", jnp.ones_like(nll)).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll * valid), "count": jnp.sum(valid),
            "correct": jnp.sum(correct * valid)}


LOSSES: dict[str, Callable[[nnx.Module, Batch], dict[str, jax.Array]]] = {
    "lm": lm_losses, "classification": classification_losses}


def fresh_dropout_keys(dropout: nnx.State, rng: jax.Array) -> nnx.State:
    """New dropout keys (one per dropout site, and per layer when stacked: the model's own and
    LoRA's) derived from the step's rng."""
    leaves, treedef = jax.tree.flatten(dropout)
    new = []
    for i, leaf in enumerate(leaves):
        key = jax.random.fold_in(rng, i)
        new.append(jax.random.split(key, leaf.shape[0]) if leaf.ndim == 2 else key)
    return jax.tree.unflatten(treedef, new)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, task: str,
                    accum_steps: int = 1, skip_nonfinite: bool = True) -> Callable:
    """`step(trainable, frozen, dropout, opt_state, batch, rng) -> (trainable, opt_state,
    metrics)`; batch arrays have the global batch as their leading dimension."""
    losses_fn = LOSSES[task]

    def loss(trainable, frozen, dropout, micro):
        model = nnx.merge(graphdef, trainable, frozen, dropout)
        out = losses_fn(model, micro)
        return out["loss_sum"], out

    grad_fn = jax.grad(loss, has_aux=True)

    def step(trainable, frozen, dropout, opt_state, batch, rng):
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

        def body(carry, xs):
            grads_sum, sums = carry
            index, mb = xs
            keys = fresh_dropout_keys(dropout, jax.random.fold_in(rng, index))
            grads, out = grad_fn(trainable, frozen, keys, mb)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, jax.tree.map(jnp.add, sums, out)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        sums0 = zero_sums(task)
        (grads, sums), _ = jax.lax.scan(body, (zeros, sums0),
                                        (jnp.arange(accum_steps), micro))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, trainable)
        with jax.named_scope("optimizer"):
            updates, new_opt_state = tx.update(grads, opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
            grad_norm = optax.global_norm(grads)
            loss_value = sums["loss_sum"] / count
            finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
            if skip_nonfinite:  # a bad batch leaves parameters and optimizer state untouched
                new_trainable = _select(finite, new_trainable, trainable)
                new_opt_state = _select(finite, new_opt_state, opt_state)
        metrics = {"loss": loss_value, "grad_norm": grad_norm, "tokens": sums["count"],
                   "finite": finite}
        if "correct" in sums:
            metrics["accuracy"] = sums["correct"] / count
        return new_trainable, new_opt_state, metrics

    return step


def _select(condition: jax.Array, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def zero_sums(task: str) -> dict[str, Any]:
    """The (scalar) sums a loss function returns, as zeros: the scan's initial carry."""
    names = ("loss_sum", "count", "correct") if task == "classification" else ("loss_sum", "count")
    return {n: jnp.zeros((), jnp.float32) for n in names}


def make_eval_step(graphdef: nnx.GraphDef, *, task: str) -> Callable:
    """`eval_step(trainable, frozen, dropout, batch) -> sums` (loss_sum, count[, correct])."""
    losses_fn = LOSSES[task]

    def eval_step(trainable, frozen, dropout, batch):
        return losses_fn(nnx.merge(graphdef, trainable, frozen, dropout), batch)

    return eval_step
