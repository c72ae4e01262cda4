"""The train command end to end on tiny models: it learns, logs, and refuses bad configs early."""

import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxft
from jaxft import evaluate, train
from tests.tiny_run import DATA, read_metrics, tiny_config, tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_training_lowers_eval_loss(mode, llama_dir, tmp_path):
    cfg = tiny_config(llama_dir, tmp_path, **{
        "lora.enabled": mode == "lora", "optim.lr": 3e-3 if mode == "lora" else 1e-3,
        "train.steps": 12, "data.eval_fraction": 0.25})
    final = train.run(cfg)
    assert final["eval_loss"] < final["base_eval_loss"] - 0.05
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics if "train_loss" in m] == list(range(1, 13))
    assert all({"train_loss", "lr", "tokens_per_s"} <= m.keys() for m in metrics
               if "train_loss" in m)
    assert json.loads((tmp_path / "config.json").read_text())["lora"]["enabled"] == (mode == "lora")
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_text_format_full_fine_tune_of_gpt2(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "gpt2", "gpt2")
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "lora.enabled": False, "optim.lr": 1e-3, "train.steps": 8,
        "data.train_path": str(DATA / "medical_text.txt"), "data.eval_fraction": 0.2})
    final = train.run(cfg)
    assert final["eval_loss"] < final["base_eval_loss"]


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_bert_classifier_lora_learns(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "bert", "bert")
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "task": "classification", "data.train_path": str(DATA / "tickets_classify.csv"),
        "lora.targets": ("query", "value"), "lora.modules_to_save": ("classifier",),
        "train.steps": 30, "optim.lr": 1e-2, "data.eval_fraction": 0.3})
    final = train.run(cfg)
    # The loop's own eval is what jaxft.evaluate finds from the checkpoint: one evaluation.
    again = evaluate.run(None, str(tmp_path / "run"))
    assert again["count"] == 12  # the same rows called right:
    assert round(final["eval_accuracy"] * 12) == round(again["accuracy"] * 12)
    np.testing.assert_allclose(final["eval_loss"], again["loss"], rtol=1e-5)
    assert [again[k] for k in ("loss", "accuracy", "macro_f1")] == [
        final[f"eval_{k}"] for k in ("loss", "accuracy", "macro_f1")]  # to the bit
    losses = [m["train_loss"] for m in read_metrics(tmp_path / "run") if "train_loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # a random encoder still fits
    assert json.loads((tmp_path / "run" / "label_map.json").read_text())


def test_train_step_compiles_once(llama_dir, tmp_path, caplog):
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            train.run(tiny_config(llama_dir, tmp_path, **{"train.steps": 4}))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "Finished XLA compilation of jit(step)"
                in r.getMessage()]
    assert len(compiles) == 1


@pytest.mark.parametrize("override, message", [
    ({"lora.rank": 0}, "config: lora.rank must be positive, got 0"),
    ({"train.epochs": -1.0}, "config: train.epochs must be 0 (use train.steps) or a positive "
     "number of passes over the data, got -1.0"),
    ({"mesh.data": 3}, "mesh: data×fsdp×expert×tensor = 3 but there are 8 devices"),
    ({"mesh.fsdp": 3, "mesh.data": -1}, "mesh: 3 (product of the fixed sizes [-1, 3, 1, 1]) "
     "does not divide the 8 devices"),
    ({"mesh.expert": 3, "mesh.data": -1}, "mesh: 3 (product of the fixed sizes [-1, 1, 3, 1]) "
     "does not divide the 8 devices"),
    ({"train.batch_size": 12}, "config: train.batch_size 12 is not divisible by the "
     "data-parallel size 8"),
    ({"task": "summarize"}, "config: task is 'summarize', expected one of lm, classification"),
    ({"train.compute_dtype": "fp8"}, "config: train.compute_dtype is 'fp8', expected one of "
     "auto, float32, bfloat16, float16"),
    ({"model.attention": "flash"}, "config: model.attention is 'flash', expected one of auto, "
     "xla, cudnn"),
    ({"model.attention": "cudnn"}, "config: model.attention 'cudnn' needs a GPU and a 16-bit "
     "train.compute_dtype; this is cpu with float32"),
])
def test_bad_config_fails_before_loading(override, message, tmp_path):
    cfg = tiny_config(tmp_path / "no-model-here", tmp_path, **override)
    with pytest.raises(jaxft.JaxftError) as e:
        train.run(cfg)
    assert str(e.value).startswith(message)


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from jaxft.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.workdir = {str(tmp_path / 'w')!r}\n"
        f"    c.model.path = {str(tmp_path / 'missing')!r}\n"
        "    c.data.train_path = 'x.jsonl'\n"
        "    return c\n")
    run = subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={config_file}",
                          "--config.lora.rank=-2"], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == \
        "error: config: lora.rank must be positive, got -2"
    run = subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={config_file}",
                          "--config.lora.rnak=4"], capture_output=True, text=True)
    assert run.returncode != 0 and "rnak" in run.stderr


@pytest.mark.slow
def test_eval_logs_generated_samples(llama_dir, tmp_path):
    from jaxft import data, generate
    from jaxft.workdir import load_run

    prompts = ("How do I reset my password?", "Where is my order?")
    cfg = tiny_config(llama_dir, tmp_path, **{"train.steps": 3, "train.sample_prompts": prompts,
                                              "train.sample_tokens": 8})
    train.run(cfg)
    logged = [m for m in read_metrics(tmp_path) if "samples" in m]
    assert [m["step"] for m in logged] == [0, 3]
    trained = load_run(tmp_path).model
    expected = generate.generate(trained, data.load_tokenizer(str(llama_dir)), list(prompts),
                                 max_new_tokens=8, chat=True)
    assert [s["completion"] for s in logged[-1]["samples"]] == expected
    assert [s["prompt"] for s in logged[-1]["samples"]] == list(prompts)
