"""GRPO equals TRL's `GRPOTrainer` on fixed prompts, completions and rewards: the advantages
for each `scale_rewards`, and, for each loss type, the loss, KL, entropy, clip ratios and the
adapters' gradients of `_compute_loss`, on a tiny Llama with a random non-zero PEFT adapter
loaded into both. The reference is the base with the adapter off in both, and the "old"
log-probabilities (num_iterations > 1) are the policy's moved by noise, so that every clip
region is visited."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft import grpo
from jaxft.errors import JaxftError
from tests.adapter_grads import assert_lora_grads_equal
from tests.tiny_run import tiny_model_dir

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")

PROMPTS = ["Where is my order?", "How do I reset my password?"]
GENERATIONS = 3
COMPLETION = 7  # completion columns
TEMPERATURE = 0.7
TOL = dict(rtol=1e-4, atol=1e-6)


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """TRL's GRPO trainer on a tiny Llama with a random PEFT adapter, a fixed batch of prompts
    and sampled-looking completions (some ending at EOS, one cut at the length limit), and
    jaxft's model with the same adapter."""
    import datasets
    import transformers

    root = tmp_path_factory.mktemp("grpo")
    model_dir = tiny_model_dir(root / "base", "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float()
    torch.manual_seed(0)
    policy = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    policy.save_pretrained(root / "adapter")
    args = trl.GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=6,
                          num_generations=GENERATIONS, max_completion_length=COMPLETION,
                          report_to=[], use_cpu=True, temperature=TEMPERATURE,
                          disable_dropout=True, bf16=False)  # float32, as jaxft on a CPU
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward_length, args=args,
                              train_dataset=datasets.Dataset.from_list(
                                  [{"prompt": p} for p in PROMPTS * 3]),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, encoded))
    prompt_ids = np.zeros((len(PROMPTS) * GENERATIONS, width), np.int64)
    prompt_mask = np.zeros_like(prompt_ids)
    for row in range(prompt_ids.shape[0]):
        ids = encoded[row // GENERATIONS]
        prompt_ids[row, width - len(ids):] = ids  # left-padded, as TRL pads prompts
        prompt_mask[row, width - len(ids):] = 1
    rng = np.random.RandomState(0)
    vocab = len(tokenizer)
    completion_ids = rng.randint(3, vocab, size=(prompt_ids.shape[0], COMPLETION))
    lengths = [7, 3, 5, 2, 6, 4]  # the first runs to the limit; the others end at EOS
    completion_mask = np.zeros_like(completion_ids)
    for row, n in enumerate(lengths):
        completion_mask[row, :n] = 1
        if n < COMPLETION:
            completion_ids[row, n - 1] = tokenizer.eos_token_id
            completion_ids[row, n:] = tokenizer.pad_token_id
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
             "completion_ids": completion_ids, "completion_mask": completion_mask}
    model = jaxft.from_pretrained(model_dir, adapter=root / "adapter")
    return trainer, batch, model


def trl_inputs(trainer, batch, advantages, old=None, ref=None) -> dict:
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    inputs["advantages"] = torch.tensor(advantages)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    if ref is not None:
        inputs["ref_per_token_logps"] = torch.tensor(ref)
    return inputs


def trl_logps(trainer, batch, adapters: bool = True) -> np.ndarray:
    ids = torch.tensor(np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1))
    mask = torch.tensor(np.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1))
    with torch.no_grad():
        if adapters:
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                     COMPLETION)
        else:
            with trainer.model.disable_adapter():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids,
                                                                         mask, COMPLETION)
    return logps.numpy()


def jaxft_batch(batch, advantages, old=None, ref=None) -> dict[str, jax.Array]:
    ids = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
    segments = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1)
    positions = np.maximum(np.cumsum(segments, 1) - 1, 0)
    out = {"input_ids": ids.astype(np.int32), "segment_ids": segments.astype(np.int32),
           "positions": positions.astype(np.int32),
           "completion_mask": batch["completion_mask"].astype(np.int32),
           "advantages": np.asarray(advantages, np.float32)}
    if old is not None:
        out["old_logps"] = old
    if ref is not None:
        out["ref_logps"] = ref
    return jax.tree.map(jnp.asarray, out)


def jaxft_loss_and_grads(model, cfg, batch):
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    losses = grpo.policy_losses(cfg)

    def mean_loss(adapters):
        sums = losses(nnx.merge(graphdef, adapters, rest), batch)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(adapters)
    return float(loss), sums, nnx.merge(graphdef, grads, rest)


def compare_grads(grads, trainer):
    want = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()
            if p.grad is not None}
    compared = assert_lora_grads_equal(grads, want, **TOL)
    assert compared == len([k for k in want if "lora_" in k])


CASES = {  # name -> (TRL settings, jaxft GrpoConfig, with old log-probs)
    "dapo": (dict(loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28), False),
    "grpo_kl": (dict(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2), False),
    "dr_grpo_old": (dict(loss_type="dr_grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2),
                    True),
    "bnpo_kl_old": (dict(loss_type="bnpo", beta=0.1, epsilon_low=0.1, epsilon_high=0.3), True),
    "grpo_old": (dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28), True),
    "dapo_kl_old": (dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_metrics_and_gradients_equal_trl(name, setup):
    trainer, batch, model = setup
    settings, with_old = CASES[name]
    cfg = grpo.GrpoConfig(loss_type=settings["loss_type"], beta=settings["beta"],
                          epsilon=settings["epsilon_low"], epsilon_high=settings["epsilon_high"],
                          max_completion_length=COMPLETION, temperature=TEMPERATURE,
                          num_generations=GENERATIONS).check()
    trainer.loss_type, trainer.beta = cfg.loss_type, cfg.beta
    trainer.epsilon_low, trainer.epsilon_high = cfg.epsilon_low, cfg.epsilon_upper
    advantages = np.asarray([1.2, -0.7, 0.3, -1.5, 0.9, 0.05], np.float32)
    policy = trl_logps(trainer, batch)
    old = ref = None
    if with_old:  # ratios spread around 1 by ±0.4 in log space: both clips are reached
        old = (policy + np.random.RandomState(1).uniform(-0.4, 0.4, policy.shape)
               ).astype(np.float32)
    if cfg.beta:
        ref = trl_logps(trainer, batch, adapters=False)
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    want_loss = trainer._compute_loss(trainer.model, trl_inputs(trainer, batch, advantages,
                                                                old, ref))
    want_loss.backward()
    want = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    got_loss, sums, grads = jaxft_loss_and_grads(model, cfg,
                                                 jaxft_batch(batch, advantages, old, ref))
    np.testing.assert_allclose(got_loss, float(want_loss), **TOL)
    got = grpo.metrics(jax.device_get(sums))
    for metric in ("entropy", *(["kl"] if cfg.beta else []), "clip_ratio/low_mean",
                   "clip_ratio/high_mean", "clip_ratio/region_mean"):
        np.testing.assert_allclose(got[metric], want[metric], **TOL, err_msg=metric)
    if with_old:
        assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/high_mean"] > 0
    compare_grads(grads, trainer)


def test_policy_and_reference_logps_equal_trl(setup):
    """Per-token log-probabilities under the sampling temperature, with the adapter and with
    it off (the reference), as TRL scores them."""
    trainer, batch, model = setup
    jbatch = jaxft_batch(batch, np.zeros(6, np.float32))
    mask = batch["completion_mask"].astype(bool)
    policy, _ = grpo.completion_logps(model, jbatch, TEMPERATURE)
    reference = grpo.reference_completion_logps(model, jbatch, TEMPERATURE)
    np.testing.assert_allclose(np.asarray(policy)[mask], trl_logps(trainer, batch)[mask],
                               **TOL)
    np.testing.assert_allclose(np.asarray(reference)[mask],
                               trl_logps(trainer, batch, adapters=False)[mask], **TOL)
    assert np.abs(np.asarray(policy) - np.asarray(reference))[mask].max() > 0.1


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_advantages_equal_trl(scale):
    """TRL's `sum_then_normalize` on three groups of four with two weighted reward functions:
    a group whose rewards are all equal (zero std), and None rewards (one completion no
    function scored, another that only one did)."""
    from trl.trainer.utils import nanstd

    nan = float("nan")
    per_func = np.asarray([[1, 0.5], [0, 0.5], [1, nan], [0, 1],
                           [2, 2], [2, 2], [2, 2], [2, 2],
                           [nan, nan], [3, 0], [1, 1], [0, 2]], np.float32)
    weights = np.asarray([1.0, 0.5], np.float32)
    got, stats = grpo.advantages(per_func, weights, 4, scale)

    # TRL's own computation, run on its own tensors (the lines of _generate_and_score_completions)
    rewards_per_func = torch.tensor(per_func)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, 4), dim=1).repeat_interleave(4, dim=0)
    std = (nanstd(rewards).expand_as(rewards) if scale == "batch"
           else nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4, dim=0))
    want = rewards - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    zero = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    assert stats["frac_reward_zero_std"] == pytest.approx(zero)
    assert stats["reward"] == pytest.approx(torch.nanmean(rewards).item())
    assert stats["reward_std"] == pytest.approx(nanstd(rewards).item())


@pytest.mark.parametrize("change, message", [
    ({"loss_type": "ppo"}, "grpo.loss_type 'ppo' unknown"),
    ({"beta": -0.1}, "grpo.beta must be >= 0"),
    ({"num_generations": 1}, "grpo.num_generations must be at least 2"),
    ({"scale_rewards": "global"}, "grpo.scale_rewards 'global' unknown"),
    ({"temperature": 0.0}, "grpo.temperature must be positive"),
])
def test_bad_settings_are_one_line(change, message):
    with pytest.raises(JaxftError, match="^" + message):
        grpo.GrpoConfig(**change).check()
