"""GRPO through `jaxft.train`: the policy samples its own completions on the weights it trains,
the reward rises, TRL's metrics are logged, the adapters export to what PEFT loads, and bad
settings, data or reward functions are refused in one line (before any weight loads where they
can be). The loss itself is compared with TRL's in `test_grpo.py`; resuming after SIGKILL in
`test_checkpoint.py`."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import export, train
from jaxft.workdir import load_run
from tests import hf_models
from tests.tiny_run import DATA, GRPO_TINY, read_metrics, tiny_config, tiny_model_dir

pytestmark = pytest.mark.slow  # GRPO training runs (see the README: the -m 'not slow' lane)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def grpo_config(model_dir, workdir, **overrides):
    return tiny_config(model_dir, workdir, **{**GRPO_TINY, **overrides})


def test_reward_rises_and_trls_metrics_are_logged(model_dir, tmp_path):
    """Full fine-tuning of a tiny random model towards a reward it can reach (the share of
    low token ids in its completions): the mean reward of the last steps clearly exceeds the
    first steps'; each log line carries TRL's metrics, with the step's completions and their
    rewards; the eval scores greedy completions of the held-out prompts."""
    run = tmp_path / "run"
    final = train.run(grpo_config(model_dir, run, **{
        "train.batch_size": 16, "train.steps": 16, "lora.enabled": False, "optim.lr": 3e-3,
        "data.eval_fraction": 0.2, "train.eval_every": 8}))
    lines = read_metrics(run)
    logged = [m for m in lines if "train_loss" in m]
    rewards = [m["reward"] for m in logged]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.03, rewards
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/low_id_share/mean",
                 "completions/mean_length", "completions/clipped_ratio", "entropy",
                 "clip_ratio/region_mean", "prompts/clipped_ratio"):
        assert name in logged[-1], name
    shown = [m["completions"] for m in lines if "completions" in m]
    assert shown and {"prompt", "completion", "reward"} <= set(shown[-1][0])
    assert "eval_reward" in final and "base_eval_reward" in final
    assert 0 <= final["eval_reward"] <= 1
    assert (run / "metrics.png").is_file()


@pytest.mark.parametrize("masked", [False, True])
def test_truncated_completions_train_only_when_not_masked(masked, model_dir, tmp_path):
    """The loss counts every completion's tokens through its EOS; with
    mask_truncated_completions, none of a completion that never reached EOS (TRL's rule), so
    each step's loss tokens are exactly the ended completions' lengths."""
    train.run(grpo_config(model_dir, tmp_path / "run", **{
        "train.steps": 3, "grpo.max_completion_length": 6, "data.eval_fraction": 0.0,
        "grpo.mask_truncated_completions": masked}))
    rows = 8
    for m in [m for m in read_metrics(tmp_path / "run") if "train_tokens" in m]:
        ended = rows * (1 - m["completions/clipped_ratio"])
        expected = (ended * m.get("completions/mean_terminated_length", 0) if masked
                    else rows * m["completions/mean_length"])
        assert m["train_tokens"] == pytest.approx(expected, abs=1e-6), m


def test_full_fine_tuning_with_kl_keeps_a_frozen_copy_as_its_reference(model_dir, tmp_path):
    """Full fine-tuning with beta > 0: the reference is the initial weights, a frozen copy
    scoring each batch, so the first step's KL is zero (the policy is the reference) and later
    ones are not; the dry run counts the copy."""
    from jaxft import plan

    overrides = {"train.steps": 4, "lora.enabled": False, "optim.lr": 3e-3, "grpo.beta": 0.1,
                 "data.eval_fraction": 0.0}
    planned = plan.make_plan(grpo_config(model_dir, tmp_path / "planned", **overrides))
    assert planned.reference == planned.trainable
    train.run(grpo_config(model_dir, tmp_path / "run", **overrides))
    kl = [m["kl"] for m in read_metrics(tmp_path / "run") if "kl" in m]
    assert abs(kl[0]) < 1e-6 and kl[-1] > 1e-4, kl


def test_lora_grpo_exports_an_adapter_peft_loads_with_jaxfts_logits(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers

    run = tmp_path / "run"
    train.run(grpo_config(model_dir, run, **{"train.steps": 3, "grpo.beta": 0.04,
                                             "data.eval_fraction": 0.0}))
    export.export_workdir(run, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    in_torch = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = hf_models.padded_batch(vocab=base.config.vocab_size)
    with torch.no_grad():
        expected = in_torch(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = np.asarray(load_run(run).model(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("overrides, message", [
    ({"grpo.reward_funcs": "no_such_module:f"},
     "config: grpo.reward_funcs entry 'no_such_module:f': module 'no_such_module' does not "
     "import (ModuleNotFoundError: No module named 'no_such_module')"),
    ({"grpo.reward_funcs": "tests.grpo_rewards:nothing"},
     "config: grpo.reward_funcs entry 'tests.grpo_rewards:nothing': tests.grpo_rewards has no "
     "function 'nothing'"),
    ({"grpo.reward_funcs": "brevity"},
     "config: grpo.reward_funcs entry 'brevity' is neither 'module:function' nor a built-in"),
    ({"grpo.reward_funcs": ""}, "config: grpo.reward_funcs is empty"),
    ({"grpo.num_generations": 3}, "config: train.batch_size 8 (completions per step) is not a "
     "multiple of grpo.num_generations 3"),
    ({"grpo.beta": -0.1}, "config: grpo.beta must be >= 0, got -0.1"),
    ({"grpo.loss_type": "ppo"}, "config: grpo.loss_type 'ppo' unknown"),
    ({"grpo.max_completion_length": 40}, "config: grpo.max_completion_length 40 leaves no room "
     "for the prompt in data.max_len 40"),
    ({"grpo.reward_weights": "1,2"}, "config: grpo.reward_weights has 2 weights for 1 reward "
     "functions"),
])
def test_bad_settings_are_one_line_before_loading(overrides, message, tmp_path):
    cfg = grpo_config(tmp_path / "no-model-here", tmp_path / "run", **overrides)
    with pytest.raises(jaxft.JaxftError) as e:
        train.run(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_prompt_data_without_a_prompt_column_is_named(model_dir, tmp_path):
    cfg = grpo_config(model_dir, tmp_path / "run",
                      **{"data.train_path": str(DATA / "support_chat.jsonl")})
    with pytest.raises(jaxft.JaxftError, match=r"support_chat.jsonl: no 'prompt' column for task "
                                               r"'grpo' \(found: messages\)"):
        train.run(cfg)


@pytest.mark.parametrize("name, message", [
    ("raises", "reward function 'raises' raised KeyError: 'no such column'"),
    ("wrong_length", "reward function 'wrong_length' returned 7 rewards for 8 completions"),
])
def test_failing_reward_stops_the_run_in_one_line_and_keeps_checkpoints(name, message,
                                                                         model_dir, tmp_path):
    """A reward function that fails at step 3 (after a checkpoint at step 2) stops the run with
    one line naming it; the saved checkpoint is still there and resumes."""
    run = tmp_path / "run"
    train.run(grpo_config(model_dir, run, **{"train.steps": 2, "checkpoint.every": 2,
                                             "data.eval_fraction": 0.0}))
    cfg = grpo_config(model_dir, run, **{"train.steps": 4, "data.eval_fraction": 0.0,
                                         "grpo.reward_funcs": f"tests.grpo_rewards:{name}"})
    with pytest.raises(jaxft.JaxftError) as e:
        train.run(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert (run / "checkpoints" / "2").is_dir()


def test_dry_run_counts_the_rollout_kv_cache(model_dir, tmp_path):
    """The dry run compiles GRPO's sampler beside its train step: the KV cache of the rollout
    rows (counted from config.json) is held in XLA's own temporaries of the compiled sampler,
    which grow with the rows by at least the cache's growth, and the run's peak covers the
    rollout's."""
    from jaxft import plan

    hf = json.loads((model_dir / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    found = {}
    for rows in (8, 32):
        found[rows] = plan.make_plan(grpo_config(model_dir, tmp_path / "run", **{
            "grpo.rollout_batch_size": rows, "train.compute_dtype": "float32"}))
        expected = (hf["num_hidden_layers"] * 2 * rows * 40 * hf["num_key_value_heads"]
                    * head_dim * 4)
        assert found[rows].rollout_cache == expected
        assert found[rows].rollout_memory["temp"] >= expected
        assert found[rows].peak_bytes >= found[rows].rollout_peak_bytes
    growth = found[32].rollout_memory["temp"] - found[8].rollout_memory["temp"]
    assert growth >= found[32].rollout_cache - found[8].rollout_cache
    assert "GRPO rollout, 32 rows × (28 prompt + 12 completion) tokens" in plan.describe(
        found[32])
    assert not (tmp_path / "run").exists()
