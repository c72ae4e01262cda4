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


# Logits `head_cross_entropy` holds at once. On a CPU 4 MiB of float32, small enough to stay
# near the cache; on an accelerator 512 MiB, so each chunk is a matmul of ~1,000 rows that keeps
# the matrix units busy (a 128k vocabulary at 1,000 positions, not 8).
CE_CHUNK_ELEMENTS = 1 << 20
CE_CHUNK_ELEMENTS_ACCELERATOR = 1 << 27


@jax.custom_vjp
def head_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array,
                       weights: jax.Array) -> jax.Array:
    """`sum weights * (logsumexp(h @ w) - (h @ w)[targets])` for h [B, T, D] and w [D, V].

    The matmul takes w's dtype and accumulates logits in float32 (for a bfloat16 model that is
    a little more exact than the unfused loss, which rounds logits to bfloat16 first), a chunk
    of positions (all B rows, so a batch-sharded h stays sharded) at a time. The gradient is
    formed in the forward pass while each chunk's logits are at hand (softmax minus one-hot,
    times the weight); the loss is a sum, so the backward pass only scales it by the scalar
    cotangent. The weight gradient is skipped when w is frozen (LoRA).
    """
    return _cross_entropy_chunks(h, w, targets, weights, need_dh=False, need_dw=False)[0]


def _cross_entropy_chunks(h, w, targets, weights, *, need_dh: bool, need_dw: bool):
    b, t, d = h.shape
    vocab = w.shape[1]
    # When the head trains, a chunk has at least D rows: its logits are then no bigger than the
    # head's gradient, which is accumulated once per chunk.
    elements = CE_CHUNK_ELEMENTS if jax.default_backend() == "cpu" else \
        CE_CHUNK_ELEMENTS_ACCELERATOR
    rows = max(elements // vocab, d if need_dw else 1)
    chunk = max(1, min(t, rows // b))  # positions per chunk
    pad = -t % chunk  # padded positions weigh 0

    def chunks(x):  # [B, T, ...] -> [T/chunk, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

    @jax.named_scope("cross_entropy")
    def body(dw, x):
        hc, tc, wc = (a.reshape(b * chunk, *a.shape[2:]) for a in x)  # B·C rows
        logits = jnp.matmul(hc, w, preferred_element_type=jnp.float32)  # B·C V
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        loss = jnp.sum((lse - target_logit) * wc)
        dh = None
        if need_dh or need_dw:
            one_hot = jnp.arange(vocab, dtype=tc.dtype) == tc[:, None]
            dlogits = (jnp.exp(logits - lse[:, None]) - one_hot) * wc[:, None]  # B·C V
            dlogits = dlogits.astype(w.dtype)
            dh = (dlogits @ w.T).reshape(b, chunk, d) if need_dh else None
            if need_dw:
                dw = dw + jnp.matmul(hc.T, dlogits, preferred_element_type=jnp.float32)
        return dw, (loss, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32) if need_dw else None
    xs = (chunks(h.astype(w.dtype)), chunks(targets), chunks(weights))
    dw, (losses, dh) = jax.lax.scan(body, dw0, xs)
    if dh is not None:  # [T/chunk, B, chunk, D] -> [B, T, D]
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, -1, d)[:, :t].astype(h.dtype)
    return jnp.sum(losses), dh, None if dw is None else dw.astype(w.dtype)


def _cross_entropy_fwd(h, w, targets, weights):
    loss, dh, dw = _cross_entropy_chunks(h.value, w.value, targets.value, weights.value,
                                         need_dh=h.perturbed, need_dw=w.perturbed)
    return loss, (dh, dw)


def _cross_entropy_bwd(residuals, g):
    dh, dw = residuals
    scale = lambda x: None if x is None else (x * g).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, None


head_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd, symbolic_zeros=True)


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
