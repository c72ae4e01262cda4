"""`save_pretrained` writes directories transformers loads with the same logits."""

import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import jaxft
from jaxft.hf import weights
from tests import hf_models
from tests.test_models import torch_logits

CASES = {
    "llama_gqa_untied_llama3_rope": transformers.AutoModelForCausalLM,
    "qwen2_bias_tied": transformers.AutoModelForCausalLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "mistral_gqa": transformers.AutoModelForCausalLM,
    "qwen3_moe_top3_raw": transformers.AutoModelForCausalLM,
    "mixtral_gqa_window": transformers.AutoModelForCausalLM,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_reloads_in_transformers(name, tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in")
    jaxft.save_pretrained(model, tmp_path / "out")
    reloaded = CASES[name].from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask), atol=1e-5, rtol=0
    )
    assert type(reloaded) is type(hf)


def test_bert_classifier_export_reloads(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in", num_labels=4)  # fresh head
    jaxft.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out"
    ).eval()
    assert type(reloaded).__name__ == "BertForSequenceClassification"
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask),
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
        atol=1e-5,
    )


def test_bert_encoder_export_keeps_base_names(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path / "in")
    jaxft.save_pretrained(jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask), atol=1e-5
    )


def test_bfloat16_export(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]())
    hf.save_pretrained(tmp_path / "in")
    jaxft.save_pretrained(
        jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out", dtype="bfloat16"
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = hf.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(reloaded.model.embed_tokens.weight, expected)


def test_export_refuses_to_overwrite(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["gpt2"]())
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in")
    with pytest.raises(jaxft.JaxftError, match="exists and is not empty"):
        jaxft.save_pretrained(model, tmp_path / "in")
    jaxft.save_pretrained(model, tmp_path / "in", overwrite=True)


def test_big_export_is_sharded_as_transformers_shards_and_streamed(tmp_path):
    """A model of 13 MB written in 1 MB shards: files named, sized and indexed as transformers
    shards them, it reloads with the same logits, and the host never holds much more than one
    shard."""
    hf = hf_models.build(hf_models.llama_config(vocab_size=1024, hidden_size=256,
                                                intermediate_size=512, num_hidden_layers=4))
    hf.save_pretrained(tmp_path / "in")
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="1MB")
    model = jaxft.from_pretrained(tmp_path / "in")
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tracemalloc.start()
    try:
        jaxft.save_pretrained(model, tmp_path / "out", max_shard_size="1MB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 12e6 and peak < 3e6  # one shard, one tensor being converted, and change

    ours = json.loads((tmp_path / "out" / weights.SAFETENSORS_INDEX_NAME).read_text())
    theirs = json.loads((tmp_path / "theirs" / weights.SAFETENSORS_INDEX_NAME).read_text())
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert sorted(ours["weight_map"]) == sorted(theirs["weight_map"])
    shards = sorted(set(ours["weight_map"].values()))
    assert len(shards) > 8
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                      for k in range(1, len(shards) + 1)]
    for name in shards:  # at most 1 MB, or one tensor bigger than that on its own
        held = [t for t, f in ours["weight_map"].items() if f == name]
        assert (tmp_path / "out" / name).stat().st_size <= 1e6 + 4096 or len(held) == 1
    assert not (tmp_path / "out" / weights.SAFETENSORS_NAME).exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = hf_models.padded_batch(vocab=1024)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask),
                               atol=1e-5, rtol=0)

    # Overwriting with a model that fits one file leaves no stale shard or index behind.
    small = hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]())
    small.save_pretrained(tmp_path / "small")
    jaxft.save_pretrained(jaxft.from_pretrained(tmp_path / "small"), tmp_path / "out",
                          overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                    "model.safetensors"]


@pytest.mark.parametrize("dtype, name", [
    (jnp.bfloat16, "bfloat16"), (jnp.float32, "float32"), (np.float16, "float16"),
    (np.dtype("float32"), "float32"), (ml_dtypes.bfloat16, "bfloat16"),
    (torch.bfloat16, "bfloat16")])
def test_dtypes_are_taken_as_jax_numpy_and_torch_users_write_them(dtype, name, tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]())
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in", dtype=dtype)
    reference = jaxft.from_pretrained(tmp_path / "in", dtype=name)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(reference, nnx.Param)), strict=True):
        assert ours.dtype == jnp.dtype(name)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    jaxft.save_pretrained(model, tmp_path / "out", dtype=dtype)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.embed_tokens.weight.dtype == getattr(torch, name)
    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        stored = f.get_tensor("model.norm.weight").dtype
    assert stored == (ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name))


def test_a_shard_size_that_is_no_size_is_named(tmp_path):
    assert weights.shard_size_bytes("5GB") == 5 * 10**9 == weights.shard_size_bytes("5 gb")
    assert weights.shard_size_bytes(1234) == 1234 and weights.shard_size_bytes("1.5MB") == 1_500_000
    with pytest.raises(jaxft.JaxftError, match=r"^max_shard_size '5XB' is not a size"):
        weights.shard_size_bytes("5XB")


def test_a_dtype_jaxft_cannot_hold_is_named(tmp_path):
    hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]()).save_pretrained(tmp_path)
    with pytest.raises(jaxft.JaxftError, match=r"^dtype is jax\.numpy\.int8, expected one of "
                       r"float32, bfloat16, float16 \(a name, or a dtype such as jnp\.bfloat16\)$"):
        jaxft.from_pretrained(tmp_path, dtype=jnp.int8)


def test_a_fresh_classifier_head_is_initialised_alone():
    """`num_labels` on an encoder checkpoint initialises the head inside one jit whose outputs
    are only the head, so XLA drops every other initialiser: the compiled program holds the
    head's bytes, not the model's, and the values are those of the whole model initialised
    under jit."""
    from jaxft.hf.model import Blueprint, ModelOptions
    from jaxft.models import bert, params

    cfg = bert.Config(vocab_size=4096, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=1024, num_labels=3)

    plan = Blueprint(bert, cfg, ModelOptions())
    missing = [p for p in params.flat_variables(nnx.state(plan.abstract(), nnx.Param))
               if cfg.may_be_missing(p)]
    init = jax.jit(plan.initialiser(missing))
    fresh = init()
    full = params.flat_variables(jax.jit(lambda: nnx.state(plan.build(), nnx.Param))())
    assert sorted(fresh) == sorted(missing) and len(full) > 4 * len(missing)
    for path, value in fresh.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(full[path].get_value()))
    head_bytes = sum(v.nbytes for v in fresh.values())
    model_bytes = sum(v.get_value().nbytes for v in full.values())
    memory = init.lower().compile().memory_analysis()
    assert head_bytes <= memory.output_size_in_bytes < head_bytes + 1024  # (+ a tuple's table)
    assert memory.temp_size_in_bytes < 4 * head_bytes < model_bytes / 10


def test_exported_files_are_readable_like_any_other_file(tmp_path):
    """safetensors' writer makes its files readable by their owner alone (0600); an export is
    for others to load, so it gets the mode every new file gets here (0644 under umask 022)."""
    import os

    from jaxft import lora
    from jaxft.hf import adapters

    hf_models.build(hf_models.llama_config()).save_pretrained(tmp_path / "base")
    model = jaxft.from_pretrained(tmp_path / "base")
    weights.save_pretrained(model, tmp_path / "full")
    cfg = lora.LoraConfig(rank=2, targets=("q_proj",))
    lora.apply_lora(model, cfg)
    adapters.save_peft_adapter(model, cfg, tmp_path / "adapter")
    mask = os.umask(0)
    os.umask(mask)
    for file in (tmp_path / "full" / "model.safetensors",
                 tmp_path / "adapter" / "adapter_model.safetensors"):
        assert os.stat(file).st_mode & 0o777 == 0o666 & ~mask, file
