"""Eval metrics against direct computations, and evaluating a jaxft.train workdir."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import jaxft
from jaxft import evaluate as E
from jaxft import generate as G
from jaxft import lora
from jaxft.workdir import load_run
from tests import hf_models
from tests.real_weights import smollm2_gguf_path

REPO = Path(__file__).parents[1]


def test_macro_f1_by_hand():
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 1, FP 2 -> 1/2; class 2: FN 1 -> 0
    assert E.macro_f1(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2])) == pytest.approx(7 / 18)
    # rows with valid = 0 do not count, not even their classes
    assert E.macro_f1(np.array([0, 1, 5]), np.array([0, 1, 4]), np.array([1, 1, 0])) == 1.0


def test_classification_metrics_match_direct_computation():
    rng = np.random.RandomState(0)
    logits = rng.normal(0, 2, (50, 4))
    labels = rng.randint(0, 4, 50)
    valid = (rng.rand(50) > 0.2).astype(np.float32)
    got = E.classification_metrics(logits, labels, valid)
    rows = [i for i in range(50) if valid[i]]
    nll = [np.log(np.sum(np.exp(logits[i]))) - logits[i, labels[i]] for i in rows]
    predicted = {i: int(np.argmax(logits[i])) for i in rows}
    f1s = []
    for c in sorted({labels[i] for i in rows} | set(predicted.values())):
        tp = sum(predicted[i] == c and labels[i] == c for i in rows)
        fp = sum(predicted[i] == c and labels[i] != c for i in rows)
        fn = sum(predicted[i] != c and labels[i] == c for i in rows)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-12)
    assert got["accuracy"] == pytest.approx(np.mean([predicted[i] == labels[i] for i in rows]))
    assert got["macro_f1"] == pytest.approx(np.mean(f1s), rel=1e-12)
    assert got["count"] == len(rows)


def packed_lm_batch(examples: list[list[int]], width: int) -> dict[str, np.ndarray]:
    """Examples packed two to a row, with the data pipeline's batch contract; the loss is on
    every next token of an example (prompt masking is the pipeline's business)."""
    rows = [examples[i:i + 2] for i in range(0, len(examples), 2)]
    batch = {k: np.zeros((len(rows), width), np.int32)
             for k in ("input_ids", "segment_ids", "positions", "targets")}
    batch["loss_mask"] = np.zeros((len(rows), width), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = len(ex)
            span = slice(start, start + n)
            batch["input_ids"][r, span] = ex
            batch["segment_ids"][r, span] = s + 1
            batch["positions"][r, span] = np.arange(n)
            batch["targets"][r, start:start + n - 1] = ex[1:]
            batch["loss_mask"][r, start:start + n - 1] = 1
            start += n
    return batch


def test_lm_loss_and_perplexity_match_transformers(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["qwen2_bias_tied"]())
    hf.save_pretrained(tmp_path)
    rng = np.random.RandomState(0)
    examples = [rng.randint(1, hf_models.VOCAB, n).tolist() for n in (5, 9, 7, 3, 8, 6)]
    batches = [packed_lm_batch(examples[:4], 16), packed_lm_batch(examples[4:], 16)]
    got = E.evaluate(jaxft.from_pretrained(tmp_path), batches, "lm")
    nll = []
    for ex in examples:  # each example alone, unpadded
        with torch.no_grad():
            logits = hf(torch.tensor([ex])).logits[0].double().numpy()
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll += [-log_probs[i, ex[i + 1]] for i in range(len(ex) - 1)]
    assert got["count"] == len(nll)
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


def test_classification_metrics_of_a_bert_classifier_match_transformers(tmp_path):
    config = hf_models.bert_config(num_labels=3)
    hf = hf_models.build(config, cls=transformers.BertForSequenceClassification)
    hf.save_pretrained(tmp_path)
    ids, mask = hf_models.padded_batch(seed=1, batch=3)
    labels = np.array([2, 0, 1])
    batches = [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
         "labels": labels, "valid": np.ones(3, np.float32)},
        {"input_ids": ids[::-1].copy(), "attention_mask": mask[::-1].copy(),
         "token_type_ids": np.zeros_like(ids), "labels": labels[::-1].copy(),
         "valid": np.array([1, 1, 0], np.float32)},  # the last row pads the batch
    ]
    got = E.evaluate(jaxft.from_pretrained(tmp_path), batches, "classification")
    with torch.no_grad():
        logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.double().numpy()
    all_logits = np.concatenate([logits, logits[::-1][:2]])
    all_labels = np.concatenate([labels, labels[::-1][:2]])
    expected = E.classification_metrics(all_logits, all_labels)
    for key in ("loss", "accuracy", "macro_f1"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["count"] == 5


# ---------------------------------------------------------------------------------------------
# A real (tiny) training run: evaluate and generate restore its latest checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """Two LoRA steps of jaxft.train on a tiny random LLaMA that uses SmolLM2's tokenizer."""
    from jaxft import train
    from jaxft.config import base_config
    from jaxft.hf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf_path())
    model_dir = tmp_path_factory.mktemp("tiny_smol")
    config = hf_models.llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    hf_models.build(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    c = base_config()
    c.workdir = str(tmp_path_factory.mktemp("run"))
    c.model.path = str(model_dir)
    c.data.train_path = str(REPO / "tests/data/support_chat.jsonl")
    c.data.max_len = 64
    c.train.steps, c.train.batch_size, c.train.eval_every = 2, 8, 0
    c.optim.lr, c.optim.warmup_steps = 1e-2, 0
    c.checkpoint.every = 0
    c.lora.rank = 4
    final = train.run(c)
    return Path(c.workdir), final


def test_workdir_eval_loss_equals_the_runs_own(trained_workdir):
    workdir, final = trained_workdir
    loaded = load_run(workdir)
    assert loaded.step == 2
    adapters = [linear.adapter for _, linear in lora.linear_modules(loaded.model)
                if linear.adapter is not None]
    assert adapters and all(np.abs(np.asarray(a.lora_b[...])).max() > 0 for a in adapters)
    got = E.run(None, str(workdir))
    assert got["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    # one evaluation: the loop's own eval step, sums and metrics, on the run's mesh, to the bit
    assert got["loss"] == final["eval_loss"]
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]), rel=1e-12)


def test_a_relative_workdir_restores(trained_workdir, monkeypatch):
    """`--workdir=runs/x` as typed: Orbax restores only from absolute paths."""
    workdir, _ = trained_workdir
    monkeypatch.chdir(workdir.parent)
    assert load_run(workdir.name).step == 2


def test_generate_from_workdir_uses_the_trained_adapters(trained_workdir):
    workdir, _ = trained_workdir
    model, path = G.load_model("unused", workdir=str(workdir))
    base = jaxft.from_pretrained(path)
    ids, mask = G.left_pad([[5, 6, 7, 8], [9, 10]], 0)
    tuned = G.generate_ids(model, ids, mask, max_new_tokens=8)
    assert (tuned != G.generate_ids(base, ids, mask, max_new_tokens=8)).any()


@pytest.mark.slow
def test_evaluate_cli_prints_json(trained_workdir):
    workdir, final = trained_workdir
    out = subprocess.run([sys.executable, "-m", "jaxft.evaluate", f"--workdir={workdir}",
                          "--max_batches=1"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["task"] == "lm"
    assert metrics["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_evaluate_cli_errors_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxft.evaluate", f"--workdir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path}: no config.json (not a " \
                                                  "jaxft training workdir)"


def test_sharded_evaluation_equals_one_device(trained_workdir, tmp_path):
    """Weights over fsdp×tensor and rows over data give the one-device metrics, LM and
    classifier alike, with the weights really split across the 8 host devices."""
    from jaxft import sharding

    workdir, _ = trained_workdir
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    one_device = load_run(workdir).model
    sharded = load_run(workdir, mesh=mesh).model
    assert not sharded.model.layers.mlp.gate_proj.kernel[...].is_fully_replicated
    rng = np.random.RandomState(3)
    vocab = sharded.config.vocab_size
    examples = [rng.randint(1, vocab, n).tolist() for n in (5, 9, 7, 3, 8, 6, 4, 10)]
    batches = [packed_lm_batch(examples, 20)]
    want = E.evaluate(one_device, batches, "lm")
    got = E.evaluate(sharded, batches, "lm", mesh)
    assert got["count"] == want["count"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)

    hf = hf_models.build(hf_models.bert_config(num_labels=3),
                         cls=transformers.BertForSequenceClassification)
    hf.save_pretrained(tmp_path)
    ids, mask = hf_models.padded_batch(seed=2, batch=4)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
             "labels": np.array([2, 0, 1, 1]), "valid": np.array([1, 1, 1, 0], np.float32)}
    want = E.evaluate(jaxft.from_pretrained(tmp_path), [batch], "classification")
    got = E.evaluate(jaxft.from_pretrained(tmp_path, mesh=mesh), [batch], "classification", mesh)
    for key in ("loss", "accuracy", "macro_f1", "count"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
