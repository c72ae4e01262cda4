"""What a run prints where no bar is drawn (a log file, a pipe, CI): a line per log step, every
eval's metrics, one line on the data with its notes, and nothing from the libraries underneath.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import optax
import pytest

from jaxft import data
from jaxft.metrics import LogWindow
from tests.test_data_helpers import FAQ, SUPPORT_CHAT, TICKETS, config
from tests.tiny_run import REPO, read_metrics, subprocess_env, tiny_model_dir, write_config_file

PREFERENCES = os.path.join(os.path.dirname(FAQ), "support_preferences.jsonl")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A tiny run with an eval in the middle, its output going to pipes; (stdout, stderr,
    workdir)."""
    tmp = tmp_path_factory.mktemp("piped")
    model_dir = tiny_model_dir(tmp / "model")
    cfg = write_config_file(tmp / "cfg.py", model_dir, tmp / "run", **{
        "train.steps": 6, "train.log_every": 2, "train.eval_every": 3, "data.eval_fraction": 0.1,
        "optim.warmup_steps": 2, "train.sample_prompts": ("hello",), "train.sample_tokens": 4})
    done = subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={cfg}"], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr, tmp / "run"


@pytest.mark.slow
def test_each_log_step_and_each_eval_is_a_line(piped_run):
    out, _, workdir = piped_run
    lines = out.splitlines()
    steps = [line.split(":")[0] for line in lines if line.startswith("step ")]
    assert steps == ["step 0 (base model)", "step 2/6", "step 3 eval", "step 4/6", "step 6/6",
                     "step 6 eval"]
    logged = {m["step"]: m for m in read_metrics(workdir)}
    step_2 = next(line for line in lines if line.startswith("step 2/6: "))
    assert step_2.startswith(f"step 2/6: train_loss {logged[2]['train_loss']:.4g}, ")
    step_3 = next(line for line in lines if line.startswith("step 3 eval: "))
    assert step_3 == (f"step 3 eval: eval_loss {logged[3]['eval_loss']:.4g}, "
                      f"eval_perplexity {logged[3]['eval_perplexity']:.4g}")
    done = lines[-1]
    assert done.startswith("done: step 6: train_loss ") and "step 6: step" not in done


@pytest.mark.slow
def test_the_data_is_one_line_and_its_notes_plain_lines(piped_run):
    out, err, _ = piped_run
    data_lines = [line for line in out.splitlines() if line.startswith("data: ")]
    assert data_lines[0].startswith("data: messages, ") and " train + " in data_lines[0]
    assert "examples, " in data_lines[0] and "packing efficiency" in data_lines[0]
    assert any("truncated to data.max_len" in line for line in data_lines[1:])
    # no bars (datasets' "Tokenizing" included), no absl-formatted notes, no library advice
    assert "Tokenizing" not in err and "\r" not in err and "pipeline.py" not in err
    assert "PyTorch was not found" not in err and "JAX version" not in err


@pytest.mark.slow
def test_the_learning_rate_is_logged_from_step_0(piped_run):
    """The plot's learning-rate panel starts with the warmup, not after it."""
    _, _, workdir = piped_run
    schedule = optax.linear_schedule(0.0, 3e-3, 2)  # the run's warmup, as optax builds it
    lr = {m["step"]: m["lr"] for m in read_metrics(workdir) if "lr" in m}
    assert lr[0] == pytest.approx(float(schedule(0))) == 0.0
    assert lr[2] == pytest.approx(float(schedule(1)), rel=1e-6)


def test_eval_and_save_time_is_not_counted_in_tokens_per_second():
    window = LogWindow("lm", ("loss_sum", "count"))
    window.tokens = 1000
    with window.paused():
        time.sleep(0.5)
    assert window.metrics()["tokens_per_s"] > 1000 / 0.1  # the 0.5 s pause is left out


def test_the_data_line_counts_pairs_and_packs_only_when_packed(tok):
    def bundle(path, task, **overrides):
        return data.build_data(config(path, max_len=128, **overrides), tok, global_batch_size=4,
                               task=task, process_index=0, process_count=1)

    pairs = bundle(PREFERENCES, "dpo", eval_fraction=0.2)
    assert pairs.describe() == (
        f"preference, {pairs.stats['examples']} train + {pairs.stats['eval_examples']} eval "
        f"pairs, {pairs.stats['rows_per_epoch']} rows of 128 tokens per epoch")
    labelled = bundle(TICKETS, "classification", eval_fraction=0.0)
    assert labelled.describe() == (
        f"classification, {labelled.stats['examples']} train examples, "
        f"{labelled.stats['rows_per_epoch']} rows of 128 tokens per epoch")
    packed = bundle(FAQ, "lm", eval_fraction=0.0, packing=True)
    assert packed.describe().endswith(
        f"packing efficiency {packed.stats['packing_efficiency']:.2f}")


@pytest.mark.parametrize("path, chat", [(SUPPORT_CHAT, True), (FAQ, False),
                                        (os.path.join(os.path.dirname(FAQ), "medical_text.txt"),
                                         False)])
def test_samples_use_a_chat_template_only_when_the_data_does(tok, path, chat):
    """A raw-text or prompt/completion run's samples are plain prompts, as its data is."""
    bundle = data.build_data(config(path, max_len=128, eval_fraction=0.0), tok,
                             global_batch_size=4, process_index=0, process_count=1)
    assert tok.chat_template  # the tokenizer has one either way
    assert (bundle.chat_template == tok.chat_template) if chat else bundle.chat_template is None


def test_a_piped_run_draws_no_datasets_bars_and_restores_the_setting(tok, capfd):
    import datasets

    datasets.enable_progress_bars()
    data.build_data(config(FAQ, max_len=128, eval_fraction=0.0), tok, global_batch_size=4,
                    process_index=0, process_count=1)
    assert "Tokenizing" not in capfd.readouterr().err  # pytest's stderr is no terminal
    assert not datasets.are_progress_bars_disabled()


def test_importing_jaxft_without_torch_gives_no_advice_about_it():
    """transformers, imported alone where torch is absent, says PyTorch was not found; jaxft,
    which trains without torch, keeps that from its users."""
    def stderr_of(code: str) -> str:
        hide_torch = "import sys; sys.modules['torch'] = None; "
        return subprocess.run([sys.executable, "-c", hide_torch + code], cwd=REPO,
                              env={k: v for k, v in subprocess_env(1, JAX_PLATFORMS="cpu")
                                   .items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"},
                              capture_output=True, text=True, timeout=300).stderr

    assert "PyTorch was not found" in stderr_of("import transformers")
    assert "PyTorch was not found" not in stderr_of("import jaxft.train")


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="pip install --no-deps chatterbot-corpus==1.3.3")
def test_the_bundled_corpus_names_its_malformed_entry(tok):
    bundle = data.build_data(config("chatterbot:chat", max_len=256), tok, global_batch_size=4,
                             process_index=0, process_count=1)
    (note,) = [n for n in bundle.notes if "malformed" in n]
    assert note.startswith("1 train row was malformed and skipped; the first: ")
    assert note.endswith("trivia.yml conversation 14: not a question followed by answers "
                         "(str 'In a game of bingo, which number is repr')")

