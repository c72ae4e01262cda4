"""Export: what jaxft trained loads in PyTorch (PEFT, merged, full) with jaxft's logits.

Every family gets adapters with random non-zero factors and goes through the writer. Three real
runs of `jaxft.train.run` on tiny models with a tiny BPE tokenizer (LoRA LLaMA, full GPT-2, LoRA
BERT classifier) go through the workdir path; the LoRA run is exported with
`python -m jaxft.export` and loaded with `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxft
from jaxft import export, lora
from jaxft.hf import adapters
from jaxft.workdir import load_run
from tests import hf_models
from tests.test_data_helpers import SUPPORT_CHAT, TICKETS, tiny_bpe
from tests.test_import_peft import assert_close, jaxft_out, real
from tests.test_models import torch_logits

ROOT = Path(__file__).resolve().parents[1]
CAUSAL = transformers.AutoModelForCausalLM
SEQ_CLS = transformers.AutoModelForSequenceClassification


def _env() -> dict[str, str]:
    # One host device: the subprocesses start fast and do not depend on the test mesh.
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu"}


# Runs `jaxft.train.run` on each (config overrides) given as JSON: one process, one import.
_TRAIN = """
import json, sys
from jaxft import config, train
for overrides in json.loads(sys.argv[1]):
    cfg = config.base_config()
    cfg.update_from_flattened_dict(overrides)
    train.run(cfg)
"""
_COMMON = {"data.max_len": 64, "data.eval_fraction": 0.0, "train.steps": 3,
           "train.batch_size": 4, "train.eval_every": 0, "optim.warmup_steps": 0,
           "optim.lr": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def training(tmp_path_factory):
    """Three real training runs, started before the first test so the in-process tests
    overlap with them: LoRA on LLaMA (checkpoints at steps 2 and 3), full fine-tuning of GPT-2,
    and a LoRA BERT classifier whose head never trains, so it stays as jaxft drew it."""
    root = tmp_path_factory.mktemp("runs")
    vocab = len(tiny_bpe(str(root / "llama")))
    for other in ("gpt2", "bert"):
        shutil.copytree(root / "llama", root / other)
    hf_models.build(hf_models.llama_config(vocab_size=vocab)).save_pretrained(root / "llama")
    hf_models.build(transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64,
                                            n_layer=2, n_head=4)).save_pretrained(root / "gpt2")
    hf_models.build(hf_models.bert_config(vocab_size=vocab),
                    cls=transformers.BertModel).save_pretrained(root / "bert")
    runs = [
        {"model.path": str(root / "llama"), "workdir": str(root / "lora_run"),
         "data.train_path": SUPPORT_CHAT, "checkpoint.every": 2, "lora.rank_pattern": "v_proj:4"},
        {"model.path": str(root / "gpt2"), "workdir": str(root / "full_run"),
         "data.train_path": SUPPORT_CHAT, "lora.enabled": False, "train.steps": 2},
        {"model.path": str(root / "bert"), "workdir": str(root / "cls_run"),
         "data.train_path": TICKETS, "task": "classification", "train.steps": 2,
         "lora.targets": ["query", "value"]},
    ]
    job = subprocess.Popen(
        [sys.executable, "-c", _TRAIN, json.dumps([{**_COMMON, **r} for r in runs])],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield job, root
    job.kill()  # only if a test failed before waiting for it


@pytest.fixture(scope="module")
def runs(training) -> dict[str, Path]:
    job, root = training
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, f"training failed:\n{output[-3000:]}"
    return {"lora": root / "lora_run", "full": root / "full_run", "cls": root / "cls_run",
            "llama": root / "llama", "gpt2": root / "gpt2", "bert": root / "bert"}


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxft.export", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------
# Every family through the writer: random non-zero factors, PEFT and merged
# ------------------------------------------------------------------------------------------------

# name -> (HF config, transformers class, jaxft LoraConfig, jaxft.from_pretrained kwargs)
FAMILIES = {
    "qwen2_bias_tied": (hf_models.CAUSAL_CONFIGS["qwen2_bias_tied"], CAUSAL,
                        lora.LoraConfig(rank=4, alpha=8, targets="all-linear", use_rslora=True,
                                        rank_pattern=(("o_proj", 2),)), {}),
    "gpt2": (hf_models.CAUSAL_CONFIGS["gpt2"], CAUSAL,
             lora.LoraConfig(rank=4, alpha=8, targets=("c_attn", "c_fc")), {}),
    "qwen3": (hf_models.CAUSAL_CONFIGS["qwen3_qk_norm_mixed_window"], CAUSAL,
              lora.LoraConfig(rank=4, alpha=8, targets="all-linear"), {}),
    "phi3_fused": (hf_models.CAUSAL_CONFIGS["phi3_longrope_window"], CAUSAL,
                   lora.LoraConfig(rank=4, alpha=8, targets=("qkv_proj", "o_proj",
                                                             "gate_up_proj")), {}),
    "gemma2_tied": (hf_models.CAUSAL_CONFIGS["gemma2_softcap_window"], CAUSAL,
                    lora.LoraConfig(rank=4, alpha=8, targets="all-linear"), {}),
    "gemma3_untied": (hf_models.CAUSAL_CONFIGS["gemma3_local_global_rope"], CAUSAL,
                      lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj",
                                                                "o_proj")), {}),
    # a mixture of experts whose layer 1 of 4 is dense: its attention sits in another stack,
    # and PEFT names its adapters among the sparse layers'
    "qwen3_moe_dense_layer": (hf_models.CAUSAL_CONFIGS["qwen3_moe_top3_raw"], CAUSAL,
                              lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "o_proj")),
                              {}),
    "gpt2_attn_c_proj_only": (hf_models.CAUSAL_CONFIGS["gpt2"], CAUSAL,
                              lora.LoraConfig(rank=4, alpha=8,
                                              targets=r"transformer\.h\.\d+\.attn\.c_proj"), {}),
    "bert_classifier": (hf_models.bert_config, transformers.BertModel,
                        lora.LoraConfig(rank=4, alpha=8, targets=("query", "value"),
                                        modules_to_save=("classifier",)), dict(num_labels=3)),
    "bert_encoder": (hf_models.bert_config, transformers.BertModel,
                     lora.LoraConfig(rank=4, alpha=8, targets=("query", "dense")), {}),
}


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory):
    """name -> (base dir, adapter dir, merged dir, jaxft outputs, base outputs)."""
    made = {}
    ids, mask = hf_models.padded_batch()
    rng = np.random.RandomState(0)
    for name, (config, cls, lora_cfg, kwargs) in FAMILIES.items():
        root = tmp_path_factory.mktemp(name)
        hf = hf_models.build(config(), cls=cls)
        hf.save_pretrained(root / "base")
        model = jaxft.from_pretrained(root / "base", **kwargs)
        base_out = None if kwargs else torch_logits(hf, ids, mask)  # a fresh head: no base
        lora.apply_lora(model, lora_cfg)
        for _, linear in lora.linear_modules(model):
            if linear.adapter is not None:
                for factor in (linear.adapter.lora_a, linear.adapter.lora_b):
                    factor[...] = jnp.asarray(rng.normal(0, 0.2, factor.shape), jnp.float32)
        expected = jaxft_out(model, ids, mask)
        export.export_model(model, lora_cfg, root / "adapter", base=None)
        export.export_model(model, lora_cfg, root / "merged", merged=True)
        made[name] = (root / "base", root / "adapter", root / "merged", expected, base_out)
    return made


def _torch_class(name: str):
    kwargs = FAMILIES[name][3]
    if "num_labels" in kwargs:
        return SEQ_CLS, kwargs
    return (transformers.AutoModel if FAMILIES[name][1] is transformers.BertModel else CAUSAL), {}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_peft_loads_jaxft_adapter_with_jaxft_logits(name, family_exports):
    base, adapter, _, expected, base_out = family_exports[name]
    cls, kwargs = _torch_class(name)
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, **kwargs), adapter).eval()
    ids, mask = hf_models.padded_batch()
    assert_close(expected, torch_logits(model, ids, mask), mask)
    if base_out is not None:
        assert np.abs(real(expected - base_out, mask)).max() > 5e-3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_merged_export_loads_in_transformers(name, family_exports):
    _, _, merged, expected, _ = family_exports[name]
    cls, _ = _torch_class(name)
    ids, mask = hf_models.padded_batch()
    assert_close(expected, torch_logits(cls.from_pretrained(merged).eval(), ids, mask), mask)


def test_peft_names_come_from_the_tensor_table(family_exports):
    gpt2 = json.loads((family_exports["gpt2"][1] / adapters.CONFIG_NAME).read_text())
    assert gpt2["fan_in_fan_out"] is True  # Conv1D: HF keeps [in, out]
    assert gpt2["target_modules"] == ["c_attn", "c_fc"]
    only = json.loads(
        (family_exports["gpt2_attn_c_proj_only"][1] / adapters.CONFIG_NAME).read_text())
    assert only["target_modules"] == r"transformer\.h\.\d+\.attn\.c_proj"  # not mlp.c_proj

    cls = family_exports["bert_classifier"][1]
    config = json.loads((cls / adapters.CONFIG_NAME).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["fan_in_fan_out"] is False
    assert config["modules_to_save"] == ["classifier", "bert.pooler.dense"]
    keys = set(load_file(cls / adapters.WEIGHTS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias",
            "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"} <= keys

    encoder = family_exports["bert_encoder"][1]
    config = json.loads((encoder / adapters.CONFIG_NAME).read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["modules_to_save"] is None
    assert "base_model.model.pooler.dense.lora_A.weight" in load_file(
        encoder / adapters.WEIGHTS_NAME)  # BertModel names carry no 'bert.' prefix


def test_adapter_round_trip_is_byte_identical(family_exports, tmp_path):
    """jaxft export -> import -> export writes the same tensors, bit for bit."""
    for name, (base, adapter, _, _, _) in family_exports.items():
        model = jaxft.from_pretrained(base, **FAMILIES[name][3])
        cfg = adapters.load_peft_adapter(model, adapter)
        adapters.save_peft_adapter(model, cfg, tmp_path / name)
        first, second = (load_file(d / adapters.WEIGHTS_NAME) for d in (adapter, tmp_path / name))
        assert set(first) == set(second), name
        assert all(first[k].tobytes() == second[k].tobytes() for k in first), name


# ------------------------------------------------------------------------------------------------
# Real runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_trained_lora_run_as_peft_adapter(runs, tmp_path):
    out = tmp_path / "adapter"
    done = _export_cli(f"--workdir={runs['lora']}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote a PEFT LoRA adapter" in done.stdout

    config = json.loads((out / adapters.CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(runs["llama"])
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (8, 16.0, {"v_proj": 4})
    assert sorted(config["target_modules"]) == sorted(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (out / "tokenizer.json").is_file() and "chat_template" in "".join(os.listdir(out))
    tensors = load_file(out / adapters.WEIGHTS_NAME)
    v_proj = "base_model.model.model.layers.1.self_attn.v_proj"
    assert tensors[f"{v_proj}.lora_A.weight"].shape == (4, 64)  # rank_pattern v_proj:4
    assert np.abs(tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]).max() > 0

    ids, mask = hf_models.padded_batch()
    trained = load_run(runs["lora"])
    assert trained.step == 3
    base = CAUSAL.from_pretrained(config["base_model_name_or_path"]).eval()
    base_out = torch_logits(base, ids, mask)
    in_torch = torch_logits(peft.PeftModel.from_pretrained(base, out).eval(), ids, mask)
    assert_close(jaxft_out(trained.model, ids, mask), in_torch, mask)
    assert np.abs(real(in_torch - base_out, mask)).max() > 5e-3  # training changed the logits


def test_merged_export_of_trained_run(runs, tmp_path):
    export.export_workdir(runs["lora"], tmp_path / "merged", merged=True)
    assert not (tmp_path / "merged" / adapters.CONFIG_NAME).exists()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    ids, mask = hf_models.padded_batch()
    merged = CAUSAL.from_pretrained(tmp_path / "merged").eval()
    assert_close(jaxft_out(load_run(runs["lora"]).model, ids, mask),
                 torch_logits(merged, ids, mask), mask)


def test_step_picks_the_checkpoint(runs, tmp_path):
    export.export_workdir(runs["lora"], tmp_path / "step2", step=2)
    export.export_workdir(runs["lora"], tmp_path / "step3")
    step2, step3 = (load_file(tmp_path / d / adapters.WEIGHTS_NAME) for d in ("step2", "step3"))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not np.array_equal(step2[name], step3[name])
    at_step2 = load_run(runs["lora"], step=2).model.model.layers.self_attn.q_proj
    np.testing.assert_array_equal(step2[name], np.asarray(at_step2.adapter.lora_b[...])[0].T)


def test_full_finetune_exports_a_model(runs, tmp_path):
    export.export_workdir(runs["full"], tmp_path / "full")
    assert not (tmp_path / "full" / adapters.CONFIG_NAME).exists()
    ids, mask = hf_models.padded_batch()
    reloaded = CAUSAL.from_pretrained(tmp_path / "full").eval()
    trained = load_run(runs["full"])
    assert trained.lora is None and trained.step == 2
    got = torch_logits(reloaded, ids, mask)
    assert_close(jaxft_out(trained.model, ids, mask), got, mask)
    base_out = torch_logits(CAUSAL.from_pretrained(runs["gpt2"]).eval(), ids, mask)
    assert np.abs(real(got - base_out, mask)).max() > 5e-3


def test_classification_run_exports_adapter_and_merged_model(runs, tmp_path):
    """The head never trained (no modules_to_save): it still travels, as jaxft drew it."""
    trained = load_run(runs["cls"])
    ids, mask = hf_models.padded_batch()
    expected = jaxft_out(trained.model, ids, mask)  # [B, 4]: the run found four labels
    export.export_workdir(runs["cls"], tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / adapters.CONFIG_NAME).read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    base = SEQ_CLS.from_pretrained(runs["bert"], num_labels=expected.shape[-1])
    in_torch = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_close(expected, torch_logits(in_torch, ids, mask), mask)
    export.export_workdir(runs["cls"], tmp_path / "merged", merged=True)
    merged = SEQ_CLS.from_pretrained(tmp_path / "merged").eval()
    assert_close(expected, torch_logits(merged, ids, mask), mask)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, ml_dtypes.bfloat16])
def test_bfloat16_adapter(runs, tmp_path, dtype):
    export.export_workdir(runs["lora"], tmp_path / "bf16", dtype=dtype)
    tensors = load_file(tmp_path / "bf16" / adapters.WEIGHTS_NAME)
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}


def test_merged_export_takes_a_jax_dtype(runs, tmp_path):
    export.export_workdir(runs["lora"], tmp_path / "merged", merged=True, dtype=jnp.float16)
    merged = CAUSAL.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.float16}


# ------------------------------------------------------------------------------------------------
# Bad input: one line each
# ------------------------------------------------------------------------------------------------


def test_workdir_without_checkpoint(runs, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text((runs["lora"] / "config.json").read_text())
    with pytest.raises(jaxft.JaxftError, match=r"run: no checkpoint in .*checkpoints \(train "
                       "first"):
        export.export_workdir(tmp_path / "run", tmp_path / "out")
    with pytest.raises(jaxft.JaxftError, match="no config.json .not a jaxft training workdir"):
        export.export_workdir(tmp_path, tmp_path / "out")
    with pytest.raises(jaxft.JaxftError, match=r"no checkpoint for step 7 \(saved steps: 2, 3\)"):
        export.export_workdir(runs["lora"], tmp_path / "out", step=7)


def test_existing_output_is_refused_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous export of the other kind
    with pytest.raises(jaxft.JaxftError, match="out: output directory exists and is not empty "
                       r"\(pass --overwrite"):
        export.export_workdir(runs["lora"], out)
    export.export_workdir(runs["lora"], out, overwrite=True)
    assert (out / adapters.CONFIG_NAME).is_file() and not (out / "config.json").exists()


def test_cli_errors_are_one_line(tmp_path):
    done = _export_cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: no config.json (not a jaxft training workdir)")
