"""Group relative policy optimisation (GRPO) with TRL's definitions (TRL 1.x `GRPOTrainer`).

A prompt is answered `num_generations` times by the policy being trained; each completion is
scored by reward functions; a completion's advantage is its reward relative to its group's:
(r − mean(group)) / (std + 1e-4), the std being the group's, the whole batch's or none
(`scale_rewards`), with Bessel's correction as TRL's `nanstd`. A reward function may return
None for a completion it cannot score; a completion none can score gets no advantage.

A batch holds prompt + completion rows: `input_ids` [B, P + C] (prompts left-padded into the
first P columns, completions right-padded after them), `segment_ids` (0 on padding),
`positions`, `completion_mask` [B, C] (the completion's tokens up to and including its EOS),
`advantages` [B], and optionally `old_logps` [B, C] (the log-probabilities of the policy that
sampled, when it has taken steps since: `num_iterations` > 1) and `ref_logps` [B, C] (the
reference's, when `beta` > 0; without them a LoRA policy's reference is its base, scored in
the step with the adapters off). Log-probabilities are taken from logits divided by the sampling
temperature, as TRL's fused head does.

Per token, with ρ = exp(log π − log π_old) (1 with π's gradient when π_old is π):
  loss = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL,
  KL = (exp(log π_ref − log π) − (log π_ref − log π) − 1)·ρ (TRL's bias-corrected k3).
Aggregated over the completion tokens as each loss type does:
- `grpo`: each completion's token mean, averaged over completions;
- `bnpo`: the micro-batch's token mean;
- `dr_grpo`: the token sum over (completions × `max_completion_length`);
- `dapo` (TRL's default): the token sum over the tokens of the whole step.
The train step divides a sum by a count (summed over accumulated micro-batches), so each type
returns the pair (sum, count) that makes its mean: with accumulation, every type equals TRL's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import experts

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
# Summed over completion tokens in the step (divided by `tokens` when logged), under TRL's names.
TOKEN_METRICS = {
    "kl_sum": "kl",
    "entropy_sum": "entropy",
    "clip_low_sum": "clip_ratio/low_mean",
    "clip_high_sum": "clip_ratio/high_mean",
    "clip_region_sum": "clip_ratio/region_mean",
}


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """GRPO's settings, with TRL's names and defaults (`GRPOConfig`)."""

    num_generations: int = 8  # completions sampled per prompt: a group
    loss_type: str = "dapo"
    beta: float = 0.0  # the KL penalty towards the reference (0: no reference pass)
    epsilon: float = 0.2  # ε_low: the ratio's lower clip
    epsilon_high: float | None = None  # ε_high (None: ε_low; DAPO's clip-higher: 0.28)
    delta: float | None = None  # an upper bound on the unclipped ratio (two-sided clipping)
    scale_rewards: str = "group"
    num_iterations: int = 1  # optimisation passes over each batch of completions
    max_completion_length: int = 256
    mask_truncated_completions: bool = False  # a completion without EOS trains nothing
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p rules out any token (else sampling sorts nothing)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def check(self) -> GrpoConfig:
        """One line for the first setting TRL would refuse (or silently misuse)."""
        if self.loss_type not in LOSS_TYPES:
            raise JaxftError(f"grpo.loss_type {self.loss_type!r} unknown (known: "
                             f"{', '.join(LOSS_TYPES)})")
        if self.scale_rewards not in SCALE_REWARDS:
            raise JaxftError(f"grpo.scale_rewards {self.scale_rewards!r} unknown (known: "
                             f"{', '.join(SCALE_REWARDS)})")
        if self.num_generations < 2:
            raise JaxftError(f"grpo.num_generations must be at least 2 (a group to compare "
                             f"with), got {self.num_generations}")
        if self.beta < 0:
            raise JaxftError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.epsilon < 0 or self.epsilon_upper < 0:
            raise JaxftError(f"grpo.epsilon and grpo.epsilon_high must be >= 0, got "
                             f"{self.epsilon} and {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.epsilon_upper:
            raise JaxftError(f"grpo.delta must exceed 1 + epsilon_high "
                             f"({1 + self.epsilon_upper}), got {self.delta}")
        if self.num_iterations < 1:
            raise JaxftError(f"grpo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_completion_length < 1:
            raise JaxftError(f"grpo.max_completion_length must be positive, got "
                             f"{self.max_completion_length}")
        if not self.temperature > 0:
            raise JaxftError(f"grpo.temperature must be positive (GRPO samples), got "
                             f"{self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise JaxftError(f"grpo.top_p must be in (0, 1] and grpo.top_k >= 0, got "
                             f"{self.top_p} and {self.top_k}")
        return self


# ---------------------------------------------------------------------------------------------
# Advantages: on the host, from the rewards
# ---------------------------------------------------------------------------------------------


def nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """TRL's `nanstd`: NaNs ignored, Bessel-corrected, NaN for fewer than two values."""
    count = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(x, axis=axis, keepdims=True)
        variance = np.nanmean((x - mean) ** 2, axis=axis) * count / (count - 1)
    return np.sqrt(np.where(count > 1, variance, np.nan)).astype(np.float32)


def weighted_rewards(rewards_per_func: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each completion's reward [N]: its functions' rewards [N, F] weighted and summed, NaNs
    (None) left out; NaN where no function scored it (TRL's unscorable completion)."""
    per_func = np.asarray(rewards_per_func, np.float32)
    rewards = np.nansum(per_func * np.asarray(weights, np.float32)[None], axis=1)
    rewards = rewards.astype(np.float32)
    rewards[np.all(np.isnan(per_func), axis=1)] = np.nan
    return rewards


def advantages(rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int,
               scale_rewards: str) -> tuple[np.ndarray, dict[str, float]]:
    """(advantages [N], TRL's reward metrics) from each completion's rewards [N, F] (NaN where a
    function returned None; consecutive groups of `num_generations` share a prompt) and the
    functions' weights [F]: TRL's `sum_then_normalize`."""
    rewards = weighted_rewards(rewards_per_func, weights)
    groups = rewards.reshape(-1, num_generations)
    with np.errstate(invalid="ignore"):
        group_mean = np.repeat(np.nanmean(groups, axis=1), num_generations)
    if scale_rewards == "batch":
        std = np.full_like(rewards, nanstd(rewards))
    else:  # group (and none, whose std only feeds the zero-std count)
        std = np.repeat(nanstd(groups, axis=1), num_generations)
    advantage = rewards - group_mean
    if scale_rewards != "none":
        advantage = advantage / (std + np.float32(1e-4))
    advantage = np.nan_to_num(advantage, nan=0.0).astype(np.float32)
    zero_std = np.isclose(std, 0.0, rtol=1.3e-6, atol=1e-5)  # torch.isclose's tolerances
    with np.errstate(invalid="ignore"):
        stats = {"reward": float(np.nanmean(rewards)), "reward_std": float(nanstd(rewards)),
                 "frac_reward_zero_std": float(np.mean(zero_std))}
    return advantage, stats


# ---------------------------------------------------------------------------------------------
# The policy loss: in the train step
# ---------------------------------------------------------------------------------------------


def completion_logps(model: nnx.Module, batch: dict[str, jax.Array], temperature: float, *,
                     with_router: bool = False):
    """(log π [B, C], entropy [B, C]) of each completion token under logits / `temperature`,
    in float32 (and with `with_router`, the routing of the real tokens). Only the C completion
    positions go through the output head."""
    c = batch["completion_mask"].shape[1]
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], return_hidden=True,
                **({"return_router": True} if with_router else {}))
    hidden, routing = out if with_router else (out, None)
    logits = model.logits(hidden[:, -c - 1:-1]).astype(jnp.float32) / temperature  # B C V
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(logp, batch["input_ids"][:, -c:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return (token, entropy, routing) if with_router else (token, entropy)


def reference_completion_logps(model: nnx.Module, batch: dict[str, jax.Array],
                               temperature: float) -> jax.Array:
    """log π_ref of each completion token: the model with its adapters (if any) off."""
    from jaxft.lora import adapters_off

    with adapters_off(model):
        return completion_logps(model, batch, temperature)[0]


def policy_losses(cfg: GrpoConfig):
    """The train step's loss function for GRPO batches: `(model, batch) -> sums`, whose
    `loss_sum / count` is TRL's loss for `cfg.loss_type` (see the module docstring), with the
    `TOKEN_METRICS` summed over the completion tokens (`tokens`)."""

    def losses(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        routed = model.config.routes_tokens
        out = completion_logps(model, batch, cfg.temperature, with_router=routed)
        logps, entropy = out[0], out[1]
        mask = batch["completion_mask"].astype(jnp.float32)
        advantage = batch["advantages"].astype(jnp.float32)[:, None]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        ratio = jnp.exp(logps - old)
        clipped = jnp.clip(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_upper)
        if cfg.delta is not None:
            ratio = jnp.minimum(ratio, cfg.delta)
        per_token = -jnp.minimum(ratio * advantage, clipped * advantage)
        kl = jnp.zeros_like(per_token)
        if cfg.beta:
            ref = (batch["ref_logps"] if "ref_logps" in batch else jax.lax.stop_gradient(
                reference_completion_logps(model, batch, cfg.temperature)))
            log_ref_ratio = ref - logps
            kl = (jnp.exp(log_ref_ratio) - log_ref_ratio - 1) * ratio
            per_token = per_token + cfg.beta * kl
        masked = per_token * mask
        rows = jnp.float32(mask.shape[0])
        if cfg.loss_type == "grpo":
            loss_sum = jnp.sum(masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0))
            count = rows
        elif cfg.loss_type == "bnpo":
            loss_sum, count = masked.sum() / jnp.maximum(mask.sum(), 1.0), jnp.float32(1.0)
        elif cfg.loss_type == "dr_grpo":
            loss_sum, count = masked.sum() / cfg.max_completion_length, rows
        else:  # dapo
            loss_sum, count = masked.sum(), mask.sum()
        low = (ratio < 1 - cfg.epsilon_low) & (advantage < 0)
        high = (ratio > 1 + cfg.epsilon_upper) & (advantage > 0)
        seen = jax.lax.stop_gradient
        sums = {"kl_sum": seen(jnp.sum(kl * mask)), "entropy_sum": seen(jnp.sum(entropy * mask)),
                "clip_low_sum": jnp.sum(low * mask), "clip_high_sum": jnp.sum(high * mask),
                "clip_region_sum": jnp.sum((low | high) * mask), "tokens": mask.sum()}
        if routed:  # TRL: + coef · the batch's load-balancing loss
            aux = experts.load_balancing_loss(out[2])
            loss_sum = loss_sum + model.config.router_aux_loss_coef * aux * count
            sums.update(aux_loss_sum=seen(aux) * count, expert_load=out[2].load)
        return {"loss_sum": loss_sum, "count": count, **sums}

    return losses


def metrics(sums: dict, prefix: str = "") -> dict[str, float]:
    """TRL's per-token metrics from summed `policy_losses` (host values)."""
    tokens = max(float(sums["tokens"]), 1.0)
    out = {prefix + name: float(sums[key]) / tokens for key, name in TOKEN_METRICS.items()}
    if "aux_loss_sum" in sums:
        out[prefix + "aux_loss"] = float(sums["aux_loss_sum"]) / max(float(sums["count"]), 1.0)
    return out
