"""Preference tuning: DPO and its common variants, with TRL's definitions (TRL 1.x `DPOTrainer`).

A batch holds pairs: every array is [B, 2, T], index 0 the chosen response and 1 the rejected
one, each after its prompt. The pair axis keeps both halves of a pair in the same row, so they
always land in the same batch and on the same device, whatever the mesh. `loss_mask` marks the
response tokens (as targets), so a sequence's log-probability is the sum over its response.

The reference model costs no second copy of the weights under LoRA: it is the same model with
its adapters switched off, run in the same step (`reference_logps`). A batch that carries
`ref_logps` uses those instead: precomputed before training (to save the second forward), or,
for full fine-tuning, scored batch by batch with a frozen copy of the initial weights.

Losses, with Δ = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)):
- `sigmoid` (DPO): −log σ(βΔ);
- `hinge` (SLiC): max(0, 1 − βΔ);
- `ipo`: (Δ̄ − 1/(2β))², where Δ̄ divides each log-ratio by its response's token count, as
  TRL does;
- `robust` (rDPO): (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε) with ε = `label_smoothing`.
TRL's `sigmoid` ignores `label_smoothing` (its smoothed variants are `robust` and others), so
jaxft refuses the combination rather than silently do the same.

A mixture of experts adds its load-balancing loss, over every real token of the batch's chosen
and rejected rows, times the config's `router_aux_loss_coef`, as TRL does (for any MoE config,
whatever its `output_router_logits`), logged as the train step logs it for every routed model
(`router_aux_loss`, with the experts' loads) and as TRL's `aux_loss` in `metrics`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import experts

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# Summed over the pairs of a batch (divided by `count`, the pairs, when logged), under TRL's
# metric names.
METRICS = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "accuracies": "rewards/accuracies",
    "margins": "rewards/margins",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """The preference loss: `beta` (the KL strength), `loss_type`, `label_smoothing` (ε)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def check(self) -> DpoConfig:
        if not self.beta > 0:
            raise JaxftError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise JaxftError(f"dpo.loss_type {self.loss_type!r} unknown (known: "
                             f"{', '.join(LOSS_TYPES)})")
        if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise JaxftError(f"dpo.label_smoothing must be in [0, 0.5) for the robust loss, got "
                             f"{self.label_smoothing}")
        if self.loss_type != "robust" and self.label_smoothing:
            raise JaxftError(f"dpo.label_smoothing applies to loss_type 'robust' (TRL's "
                             f"definitions); {self.loss_type!r} takes none")
        return self


def pairs_flat(x: jax.Array) -> jax.Array:
    """[B, 2, …] -> [2B, …], each pair's chosen row next to its rejected one."""
    return x.reshape(-1, *x.shape[2:])


def sequence_logps(model: nnx.Module, batch: dict[str, jax.Array], *,
                   with_router: bool = False):
    """log π(response | prompt) for both halves of every pair: [B, 2], summed over the response
    tokens (`loss_mask`) in float32; with `with_router` (a mixture of experts), also the
    routing of the real tokens (`experts.RouterStats`)."""
    b = batch["input_ids"].shape[0]
    out = model(pairs_flat(batch["input_ids"]), segment_ids=pairs_flat(batch["segment_ids"]),
                positions=pairs_flat(batch["positions"]),
                **({"return_router": True} if with_router else {}))
    logits, routing = out if with_router else (out, None)  # 2B T V
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logp, pairs_flat(batch["targets"])[..., None], axis=-1)[..., 0]
    mask = pairs_flat(batch["loss_mask"]).astype(jnp.float32)
    logps = jnp.sum(token * mask, axis=-1).reshape(b, 2)
    return (logps, routing) if with_router else logps


def reference_logps(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """The reference model's `sequence_logps`: `batch["ref_logps"]` when precomputed, else the
    model with every adapter switched off (the frozen base), without gradients."""
    if "ref_logps" in batch:
        return batch["ref_logps"].astype(jnp.float32)
    from jaxft.lora import has_adapters

    if not has_adapters(model):
        raise JaxftError("DPO without LoRA needs the batch's reference log-probabilities "
                         "(ref_logps): the model has no adapters to switch off")
    return jax.lax.stop_gradient(base_logps(model, batch))


def base_logps(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """`sequence_logps` of the model with its adapters (if any) switched off: the reference
    pass scores pairs with this before training, from the initial weights."""
    from jaxft.lora import adapters_off

    with adapters_off(model):
        return sequence_logps(model, batch)


def pair_losses(cfg: DpoConfig, policy: jax.Array, reference: jax.Array,
                tokens: jax.Array) -> jax.Array:
    """The per-pair loss [B] from log-probabilities [B, 2] (chosen, rejected) and the responses'
    token counts [B, 2]."""
    ratios = policy - reference  # B 2: the implicit rewards over β
    delta = ratios[:, 0] - ratios[:, 1]
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta)
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if cfg.loss_type == "ipo":
        per_token = ratios / jnp.maximum(tokens, 1.0)
        return (per_token[:, 0] - per_token[:, 1] - 1.0 / (2.0 * beta)) ** 2
    if cfg.loss_type == "robust":
        clean = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
        flipped = -eps * jax.nn.log_sigmoid(-beta * delta)
        return (clean - flipped) / (1.0 - 2.0 * eps)
    raise JaxftError(f"dpo.loss_type {cfg.loss_type!r} unknown (known: {', '.join(LOSS_TYPES)})")


def preference_losses(cfg: DpoConfig):
    """The train step's loss function for preference pairs: `(model, batch) -> sums`, with
    `loss_sum` and the `METRICS` summed over the batch's real pairs (`valid`, all by default)
    and `count` the number of pairs, so the step's mean is TRL's mean over pairs."""

    def losses(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        routed = model.config.routes_tokens
        policy, routing = (sequence_logps(model, batch, with_router=True) if routed
                           else (sequence_logps(model, batch), None))
        reference = reference_logps(model, batch)
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)
        loss = pair_losses(cfg, policy, reference, tokens)
        valid = batch.get("valid", jnp.ones_like(loss)).astype(jnp.float32)
        rewards = jax.lax.stop_gradient(cfg.beta * (policy - reference))
        per_pair = {
            "rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1],
            "accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
            "margins": rewards[:, 0] - rewards[:, 1],
            "logps_chosen": jax.lax.stop_gradient(policy[:, 0]),
            "logps_rejected": jax.lax.stop_gradient(policy[:, 1]),
        }
        sums = {name: jnp.sum(value * valid) for name, value in per_pair.items()}
        loss_sum, count = jnp.sum(loss * valid), jnp.sum(valid)
        if routing is not None:  # TRL: mean pair loss + coef · aux, aux over the whole batch
            aux = experts.load_balancing_loss(routing)
            loss_sum = loss_sum + model.config.router_aux_loss_coef * aux * count
            # pair-weighted, as the loss is (the train step's window for routed models)
            sums.update(aux_loss_sum=jax.lax.stop_gradient(aux) * count,
                        expert_load=routing.load)
        return {"loss_sum": loss_sum, "count": count, **sums}

    return losses


def metrics(sums: dict, prefix: str = "") -> dict[str, float]:
    """The mean loss and TRL's metrics from summed `preference_losses` (host values), under
    TRL's names with `prefix` ('eval_' for an evaluation, as TRL names them)."""
    count = max(float(sums["count"]), 1.0)
    names = {**METRICS, **({"aux_loss_sum": "aux_loss"} if "aux_loss_sum" in sums else {})}
    return {f"{prefix}loss": float(sums["loss_sum"]) / count,
            **{prefix + name: float(sums[key]) / count for key, name in names.items()}}
