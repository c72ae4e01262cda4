"""`task='dpo'` through `jaxft.train` and everything after it: the recipe on the real SmolLM2,
PEFT export, generation and evaluation of a DPO run, the dry run, and bad preference input.

(TRL parity of the loss, the data and a 20-step curve is `test_dpo.py`; exact resume of a DPO
run is in `test_checkpoint.py`.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import JaxftError, data, plan, train
from jaxft import evaluate as E
from jaxft.export import export_workdir
from jaxft.workdir import load_run
from tests import hf_models
from tests.tiny_run import DATA, REPO, read_metrics, subprocess_env, tiny_config, tiny_model_dir

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

PAIRS = DATA / "support_preferences.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def dpo_config(model_dir: Path, workdir: Path, **overrides):
    return tiny_config(model_dir, workdir, task="dpo", **{
        "data.train_path": str(PAIRS), "data.eval_fraction": 0.25, "train.steps": 6,
        "train.batch_size": 8, "dpo.beta": 0.5, **overrides})


@pytest.fixture(scope="module")
def dpo_run(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo_run")
    final = train.run(dpo_config(model_dir, workdir))
    return workdir, final


def test_a_lora_dpo_run_logs_trls_metrics_and_learns(dpo_run):
    workdir, final = dpo_run
    records = read_metrics(workdir)
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
    train_records = [m for m in records if "train_loss" in m]
    assert len(train_records) == 6 and all(set(names) <= m.keys() for m in train_records)
    assert train_records[0]["train_loss"] == pytest.approx(np.log(2), abs=1e-6)  # B = 0
    assert {"eval_" + n for n in names} <= final.keys()
    assert final["eval_loss"] < final["base_eval_loss"] - 0.05
    assert final["eval_rewards/margins"] > 0 and final["eval_rewards/accuracies"] > 0.5
    assert (workdir / "metrics.png").is_file()


def test_a_dpo_run_exports_an_adapter_peft_loads(dpo_run, tmp_path):
    import peft
    import torch
    import transformers

    workdir, _ = dpo_run
    out = export_workdir(workdir, tmp_path / "adapter")
    trained = load_run(workdir)
    ids, mask = hf_models.padded_batch()
    base = transformers.AutoModelForCausalLM.from_pretrained(trained.base).float().eval()
    tuned = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        want = tuned(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                     ).logits.numpy()
    got = np.asarray(trained.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_resuming_with_another_preference_loss_is_refused_and_changes_nothing(dpo_run,
                                                                            model_dir):
    """Another β or loss type is another objective: a resume with either is refused by name,
    and the run's record (config.json, which names its β) is left as it was."""
    workdir, _ = dpo_run
    record = (workdir / "config.json").read_bytes()
    for overrides, shown in (({"dpo.beta": 0.1}, "'beta': 0.1"),
                             ({"dpo.loss_type": "hinge"}, "'loss_type': 'hinge'")):
        with pytest.raises(jaxft.JaxftError, match=r"checkpoints/6: checkpoint was written by a "
                           rf"run with a different dpo \(.*vs now .*{shown}"):
            train.run(dpo_config(model_dir, workdir, **{"train.steps": 8, **overrides}))
    assert (workdir / "config.json").read_bytes() == record


def test_a_dpo_run_generates_and_evaluates_as_any_run(dpo_run):
    workdir, final = dpo_run
    done = subprocess.run([sys.executable, "-m", "jaxft.generate", f"--workdir={workdir}",
                           "--prompt=Where is my order?", "--max_new_tokens=4"], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Where is my order?" in done.stdout
    got = E.run(None, str(workdir))
    assert got["task"] == "dpo"
    assert got["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert got["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"])
    # one evaluation: the loop's eval step, sums and metrics on the run's mesh, to the bit
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert got[name] == final[f"eval_{name}"], name


def test_full_fine_tuning_scores_the_reference_once_before_training(model_dir, tmp_path,
                                                                    capsys):
    cfg = dpo_config(model_dir, tmp_path, **{"lora.enabled": False, "dpo.precompute_ref": True,
                                             "optim.lr": 1e-3})
    final = train.run(cfg)
    assert "dpo: reference log-probabilities of 18 + 6 pairs" in capsys.readouterr().out
    assert final["eval_loss"] < final["base_eval_loss"] - 0.05


def test_full_fine_tuning_with_a_frozen_reference_copy_equals_precomputing(model_dir,
                                                                          tmp_path):
    """The frozen copy of the initial weights scores each batch as the up-front pass scored
    it, so the two runs train alike; jaxft.evaluate rebuilds the reference from the base."""
    full = {"lora.enabled": False, "optim.lr": 1e-3}
    precomputed = train.run(dpo_config(model_dir, tmp_path / "pre", **full,
                                       **{"dpo.precompute_ref": True}))
    workdir = tmp_path / "copy"
    copied = train.run(dpo_config(model_dir, workdir, **full))
    assert copied["eval_loss"] < copied["base_eval_loss"] - 0.05
    for key in ("train_loss", "eval_loss", "eval_rewards/chosen", "eval_rewards/margins"):
        assert copied[key] == pytest.approx(precomputed[key], rel=1e-5, abs=1e-6), key
    got = E.run(None, str(workdir))
    assert got["loss"] == pytest.approx(copied["eval_loss"], rel=1e-5)
    assert got["rewards/margins"] == pytest.approx(copied["eval_rewards/margins"], rel=1e-4)


def test_precomputed_reference_equals_the_in_step_one_under_lora(dpo_run, model_dir, tmp_path):
    _, in_step = dpo_run
    final = train.run(dpo_config(model_dir, tmp_path, **{"dpo.precompute_ref": True}))
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins"):
        assert final[key] == pytest.approx(in_step[key], rel=1e-4, abs=1e-6), key


def test_dry_run_counts_the_reference_forward(model_dir, tmp_path):
    """XLA's own FLOP count of the compiled DPO step (one layer: it counts everything) agrees
    with the planner's, which adds the reference's forward to LoRA's training step."""
    one_layer = tiny_model_dir(tmp_path / "one", "llama", num_hidden_layers=1)
    for precompute in (False, True):
        p = plan.make_plan(dpo_config(one_layer, tmp_path / "run", **{
            "train.steps": 1, "dpo.precompute_ref": precompute}))
        assert 0.8 < p.analytic_flops / (p.xla_flops * p.devices) < 1.2, (precompute, p)
        assert p.memory["temp"] > 0 and p.reference is None


def test_dry_run_of_full_fine_tuning_counts_the_frozen_reference_copy(model_dir, tmp_path):
    """Full fine-tuning without precompute_ref holds a second copy of the weights: the planner
    counts it, exactly the trainable weights' bytes, in the peak it reports."""
    cfg = dpo_config(model_dir, tmp_path / "run", **{"lora.enabled": False, "train.steps": 1})
    copy = plan.make_plan(cfg)
    cfg.dpo.precompute_ref = True
    precomputed = plan.make_plan(cfg)
    assert copy.reference == copy.trainable and precomputed.reference is None
    assert copy.peak_bytes == precomputed.peak_bytes + copy.trainable.per_device
    assert "reference copy (DPO)" in plan.describe(copy)


def test_recipe_raises_reward_accuracy_on_the_bundled_smollm2(tmp_path):
    """configs/dpo.py as a user runs it on the real SmolLM2 and the bundled pairs, only shorter:
    held-out reward accuracy rises from 0 (policy = reference, every reward 0) past chance, on
    24 held-out pairs after 20 steps (the README gives the full run's 40 steps on 48)."""
    from tests.real_weights import package_dir, smollm2_gguf_path

    smollm2_gguf_path()
    package_dir("chatterbot_corpus")
    done = subprocess.run(
        [sys.executable, "-m", "jaxft.train", "--config=configs/dpo.py",
         f"--config.workdir={tmp_path / 'run'}", "--config.train.steps=20",
         "--config.train.eval_every=20", "--config.train.eval_batches=6",
         "--config.train.sample_prompts=",
         "--config.checkpoint.every=0"],
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    base, tuned = records[0], records[-1]
    assert base["eval_rewards/accuracies"] == 0.0 and base["eval_loss"] == pytest.approx(
        np.log(2), abs=1e-6)
    assert tuned["eval_rewards/accuracies"] > 0.55, tuned
    assert tuned["eval_rewards/margins"] > 0 and tuned["eval_loss"] < base["eval_loss"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, naming the file, row or field
# ---------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Where is my order?", "chosen": " It ships today.", "rejected": " No idea."}


@pytest.mark.parametrize("rows, fields, message", [
    ([{"prompt": "a", "chosen": "b"}], {},
     r"cannot detect the data format: found columns \['chosen', 'prompt'\], expected "
     r"\['chosen', 'prompt', 'rejected'\] or \['chosen', 'rejected'\]"),
    ([GOOD, dict(GOOD, prompt="word " * 80)], {},
     r"pairs.jsonl line 2: the prompt is \d+ tokens, leaving no room for a response in "
     r"data.max_len=64 \(raise it, or set data.max_prompt_len\)"),
    ([GOOD, dict(GOOD, rejected=GOOD["chosen"])], {},
     "pairs.jsonl line 2: chosen and rejected are the same"),
    ([GOOD, dict(GOOD, chosen=[{"role": "assistant", "content": "x"}])], {},
     "pairs.jsonl line 2: column 'chosen' holds a list but most rows hold a string"),
    ([{"prompt": "hi", "chosen": [{"role": "assistant", "content": "x"}],
       "rejected": [{"role": "assistant", "content": "y"}]}], {},
     "pairs.jsonl line 1: prompt, chosen and rejected must all be texts or all be message "
     "lists"),
    ([{"prompt": [{"role": "user", "content": "hi"}],
       "chosen": [{"role": "bot", "content": "x"}],
       "rejected": [{"role": "assistant", "content": "y"}]}], {},
     "pairs.jsonl line 1: chosen: message 1 has role 'bot'"),
    ([GOOD], {"format": "messages"},
     "task 'dpo' needs data.format 'preference' \\(prompt/chosen/rejected columns\\), got "
     "'messages'"),
])
def test_bad_pairs_are_one_line(rows, fields, message, model_dir, tmp_path):
    cfg = data.default_config()
    cfg.train_path = str(write_rows(tmp_path / "pairs.jsonl", rows))
    cfg.max_len, cfg.eval_fraction = 64, 0.0
    cfg.update(fields)
    with pytest.raises(JaxftError, match=message):
        data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=1,
                        task="dpo", process_index=0, process_count=1)


def test_skip_bad_rows_skips_and_counts_bad_pairs(model_dir, tmp_path):
    rows = [GOOD, dict(GOOD, prompt="word " * 80), dict(GOOD, rejected=GOOD["chosen"]), GOOD]
    cfg = data.default_config()
    cfg.train_path = str(write_rows(tmp_path / "pairs.jsonl", rows))
    cfg.max_len, cfg.eval_fraction, cfg.skip_bad_rows = 64, 0.0, True
    bundle = data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=2,
                             task="dpo", process_index=0, process_count=1)
    assert (bundle.stats["examples"], bundle.stats["skipped_bad_rows"]) == (2, 2)
    batch = next(bundle.train)
    assert batch["input_ids"].shape == (2, 2, 64) and batch["valid"].tolist() == [1.0, 1.0]


def test_overlong_drop_drops_and_counts_whole_pairs(model_dir, tmp_path):
    rows = [GOOD, dict(GOOD, chosen=" ships" * 80)]
    cfg = data.default_config()
    cfg.train_path = str(write_rows(tmp_path / "pairs.jsonl", rows))
    cfg.max_len, cfg.eval_fraction, cfg.overlong = 64, 0.0, "drop"
    bundle = data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=1,
                             task="dpo", process_index=0, process_count=1)
    assert (bundle.stats["examples"], bundle.stats["dropped_overlong"]) == (1, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"dpo.beta": 0.0}, "config: dpo.beta must be positive, got 0.0"),
    ({"dpo.loss_type": "kto"}, "config: dpo.loss_type 'kto' unknown"),
    ({"data.max_prompt_len": -1}, "config: data.max_prompt_len must be >= 0, got -1"),
])
def test_bad_preference_config_is_refused_before_loading(overrides, message, tmp_path):
    cfg = dpo_config(tmp_path / "no_model_here", tmp_path / "run", **overrides)
    with pytest.raises(JaxftError, match=message):
        train.run(cfg)
    assert not (tmp_path / "run").exists()


def test_lm_task_refuses_preference_format(model_dir, tmp_path):
    cfg = data.default_config()
    cfg.train_path, cfg.format = str(PAIRS), "preference"
    with pytest.raises(JaxftError, match="data.format 'preference' needs task='dpo'"):
        data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=1,
                        task="lm", process_index=0, process_count=1)
