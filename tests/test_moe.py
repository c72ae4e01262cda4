"""Mixture-of-experts models against transformers: the load-balancing loss and the training
loss it joins, both checkpoint layouts (one tensor per expert, and transformers 5's fused
experts), the names export writes, and bad configs and checkpoints refused naming the field or
tensor. Logits, generation and export round trips are in the per-family suites
(`hf_models.CAUSAL_CONFIGS`)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import jaxft
from jaxft import train_step
from jaxft.errors import JaxftError
from tests import hf_models

MOE = ["qwen3_moe_topk_norm", "qwen3_moe_top3_raw", "mixtral_gqa_window"]


def saved(name: str, path, **overrides):
    config = hf_models.CAUSAL_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    hf = hf_models.build(config)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("name", MOE)
def test_training_loss_is_transformers_loss_with_its_aux_loss(name, tmp_path):
    """With output_router_logits on, transformers' loss is the mean next-token loss plus
    router_aux_loss_coef times its load-balancing loss over the unpadded tokens; jaxft's
    training loss (what the train step differentiates) is the same number, and the aux loss
    alone is transformers' `aux_loss`."""
    hf = saved(name, tmp_path, output_router_logits=True, router_aux_loss_coef=0.25)
    ids, mask = hf_models.padded_batch()
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels))
    model = jaxft.from_pretrained(tmp_path)
    _, aux = model(jnp.asarray(ids), jnp.asarray(mask), return_router=True)
    np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
             "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
             "loss_mask": jnp.asarray(np.roll(labels, -1, axis=1)[:, :] != -100)
             .at[:, -1].set(False)}
    sums = train_step.lm_losses(model, batch)
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["count"]), float(out.loss),
                               rtol=1e-5)


def test_aux_loss_stays_out_of_the_loss_unless_output_router_logits(tmp_path):
    """transformers' default (`output_router_logits: false`, as Qwen3-30B-A3B ships): the
    loss is the cross-entropy alone."""
    hf = saved("qwen3_moe_topk_norm", tmp_path)
    ids, mask = hf_models.padded_batch()
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        expected = float(hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            labels=torch.tensor(labels)).loss)
    model = jaxft.from_pretrained(tmp_path)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
             "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
             "loss_mask": jnp.asarray(np.roll(mask, -1, axis=1) == 1).at[:, -1].set(False)}
    sums = train_step.lm_losses(model, batch)
    np.testing.assert_allclose(float(sums["loss_sum"] / sums["count"]), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_moe_topk_norm", "mixtral_gqa_window"])
def test_fused_expert_checkpoint_loads(name, tmp_path):
    """A checkpoint written from transformers 5's in-memory state (`mlp.experts.gate_up_proj`
    [E, 2F, D], `down_proj` [E, D, F], `mlp.gate`) gives the same model as the per-expert
    one transformers saves."""
    hf = saved(name, tmp_path / "saved")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, fused / "model.safetensors")
    (fused / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    ids, mask = hf_models.padded_batch()
    got = np.asarray(jaxft.from_pretrained(fused)(jnp.asarray(ids), jnp.asarray(mask)))
    want = np.asarray(jaxft.from_pretrained(tmp_path / "saved")(jnp.asarray(ids),
                                                                 jnp.asarray(mask)))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["qwen3_moe_topk_norm", "mixtral_gqa_window"])
def test_export_writes_the_names_transformers_saves(name, tmp_path):
    saved(name, tmp_path / "in")
    jaxft.save_pretrained(jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out")
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    original = safetensors.numpy.load_file(tmp_path / "in" / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize("fields, message", [
    ({"num_experts_per_tok": 7}, "num_experts_per_tok must be between 1 and the 6 experts, "
                                 "got 7"),
    ({"mlp_only_layers": [1]}, "layer 1 is a dense MLP layer (mlp_only_layers / "
                               "decoder_sparse_step)"),
    ({"decoder_sparse_step": 2}, "layer 0 is a dense MLP layer"),
])
def test_bad_expert_config_is_named(fields, message, tmp_path):
    saved("qwen3_moe_topk_norm", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(JaxftError, match=r"config\.json") as err:
        jaxft.from_pretrained(tmp_path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("drop, named", [
    ("model.layers.2.mlp.experts.4.up_proj.weight",
     "missing tensor model.layers.2.mlp.experts.4.up_proj.weight"),
    ("model.layers.0.mlp.gate.weight", "missing tensor model.layers.0.mlp.gate.weight"),
])
def test_missing_expert_tensor_is_named(drop, named, tmp_path):
    saved("qwen3_moe_topk_norm", tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors[drop]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(JaxftError, match=named.replace(".", r"\.")):
        jaxft.from_pretrained(tmp_path)


def test_expert_index_past_the_config_is_named(tmp_path):
    saved("mixtral_gqa_window", tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    extra = "model.layers.1.block_sparse_moe.experts.4.w1.weight"
    tensors[extra] = tensors["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(JaxftError, match=f"tensor {extra} is for expert 4 but the config has "
                                         "4 experts"):
        jaxft.from_pretrained(tmp_path)
