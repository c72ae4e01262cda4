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
from jaxft.models import experts
from tests import hf_models

MOE = ["qwen3_moe_topk_norm", "qwen3_moe_top3_raw", "mixtral_gqa_window", "gpt_oss_sinks_window"]


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
    _, routing = model(jnp.asarray(ids), jnp.asarray(mask), return_router=True)
    aux = experts.load_balancing_loss(routing)
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


@pytest.mark.parametrize("name", MOE)
def test_export_writes_the_names_transformers_saves(name, tmp_path):
    saved(name, tmp_path / "in")
    jaxft.save_pretrained(jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out")
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    original = safetensors.numpy.load_file(tmp_path / "in" / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_dense_layers_on_the_sparse_step_match_transformers(tmp_path):
    """decoder_sparse_step=2 makes layers 0 and 2 dense around a sparse layer 1: each stretch
    of alike layers runs from its own stack, with transformers' logits and aux loss (the dense
    layers route nothing)."""
    hf = saved("qwen3_moe_topk_norm", tmp_path, decoder_sparse_step=2,
               output_router_logits=True)
    ids, mask = hf_models.padded_batch()
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask))
    model = jaxft.from_pretrained(tmp_path)
    assert model.config.dense_layers == (0, 2)
    logits, routing = model(jnp.asarray(ids), jnp.asarray(mask), return_router=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], out.logits.numpy()[real], atol=1e-4,
                               rtol=0)
    np.testing.assert_allclose(float(experts.load_balancing_loss(routing)),
                               float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"num_experts_per_tok": 7}, "num_experts_per_tok must be between 1 and the 6 experts, "
                                 "got 7"),
    ({"mlp_only_layers": [0, 1, 2]}, "no layer routes to experts (mlp_only_layers / "
                                     "decoder_sparse_step make every layer dense)"),
    ({"mlp_only_layers": [3]}, "mlp_only_layers must list layer indices below the 3 layers, "
                               "got [3]"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a whole number of at least 1, "
                                 "got 0"),
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
    ("model.layers.1.mlp.up_proj.weight", "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("model.layers.3.self_attn.k_proj.weight",
     "missing tensor model.layers.3.self_attn.k_proj.weight"),
])
def test_missing_expert_tensor_is_named(drop, named, tmp_path):
    saved("qwen3_moe_top3_raw", tmp_path)  # layer 1 dense, layers 0, 2 and 3 sparse
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


# ---------------------------------------------------------------------------------------------
# LoRA on the experts: PEFT's target_parameters
# ---------------------------------------------------------------------------------------------

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def with_expert_adapters(model_dir, targets=("q_proj",), parameters=EXPERT_WEIGHTS, seed=0):
    """A jaxft model with adapters on `targets` and the expert weights `parameters`, every B
    drawn non-zero so that each adapter changes the logits."""
    from jaxft import lora

    model = jaxft.from_pretrained(model_dir)
    cfg = lora.LoraConfig(rank=2, alpha=6.0, targets=targets, target_parameters=parameters)
    lora.apply_lora(model, cfg, seed=1)
    rng = np.random.RandomState(seed)
    factors = [a.lora_b for a in lora.expert_adapters(model).values()]
    factors += [lin.adapter.lora_b for _, lin in lora.linear_modules(model) if lin.adapter]
    factors += [adapter.lora_b for adapter in lora.router_adapters(model).values()]
    for b in factors:
        b[...] = jnp.asarray(rng.normal(0, 0.3, b.shape), jnp.float32)
    return model, cfg


@pytest.mark.parametrize("name, parameters", [
    ("qwen3_moe_topk_norm", EXPERT_WEIGHTS),
    ("mixtral_gqa_window", EXPERT_WEIGHTS),
    ("qwen3_moe_top3_raw", ("mlp.experts.down_proj",)),
    # gpt-oss: its experts in [in, out] order (PEFT's is_transposed), its biased router too
    ("gpt_oss_sinks_window", (*EXPERT_WEIGHTS, "mlp.router.weight")),
])
def test_expert_adapters_load_in_peft_with_jaxfts_logits(name, parameters, tmp_path):
    """Exported, the adapters are PEFT's `target_parameters` adapters: `PeftModel` loads them
    and computes jaxft's logits; merged, transformers computes them too."""
    import peft

    from jaxft.hf import adapters

    hf = saved(name, tmp_path / "base")
    model, cfg = with_expert_adapters(tmp_path / "base", parameters=parameters)
    adapters.save_peft_adapter(model, cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(parameters)
    ids, mask = hf_models.padded_batch()
    real = mask.astype(bool)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(jaxft.from_pretrained(tmp_path / "base")(jnp.asarray(ids),
                                                                jnp.asarray(mask)))
    assert np.abs(got[real] - base[real]).max() > 0.1  # the adapters do change the logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)

    from jaxft import lora

    jaxft.save_pretrained(lora.merge_lora(model), tmp_path / "merged")
    merged = hf_models.transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded = merged(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(reloaded[real], want[real], atol=1e-4, rtol=0)


def test_expert_adapters_count_as_peft_counts(tmp_path):
    """The same targets give PEFT's trainable parameter count."""
    import peft

    from jaxft import lora

    hf = saved("mixtral_gqa_window", tmp_path)
    model, cfg = with_expert_adapters(tmp_path)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=list(EXPERT_WEIGHTS)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    from flax import nnx

    assert lora.count_parameters(nnx.state(model, nnx.LoRAParam)) == trainable


@pytest.mark.parametrize("name, change, message", [
    ("qwen3_moe_topk_norm", {"target_parameters": ("mlp.experts.up_proj",)},
     "lora target parameter 'mlp.experts.up_proj' matches no expert weight of this qwen3_moe "
     "model (its expert weights: mlp.experts.down_proj, mlp.experts.gate_up_proj, "
     "mlp.gate.weight)"),
    ("qwen3_moe_topk_norm", {"target_parameters": EXPERT_WEIGHTS, "dropout": 0.1},
     "lora.target_parameters take no lora.dropout and no lora.use_dora"),
    ("qwen3_qk_norm_mixed_window", {"target_parameters": EXPERT_WEIGHTS},
     "it has no experts: target_parameters are for mixtures of experts"),
    ("qwen3_moe_top3_raw", {"targets": ("q_proj", "up_proj")},
     "lora target 'up_proj' is fused with 'gate_proj' into the experts' gate_up_proj of this "
     "qwen3_moe model: name both or neither"),
    ("mixtral_gqa_window", {"targets": ("w1", "w2")},
     "lora target 'w1' is fused with 'w3' into the experts' gate_up_proj of this mixtral model"),
])
def test_expert_targets_that_do_not_fit_are_named(name, change, message, tmp_path):
    import dataclasses

    from jaxft import lora

    saved(name, tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    cfg = dataclasses.replace(lora.LoraConfig(targets=("q_proj",)), **change)
    with pytest.raises(JaxftError) as err:
        lora.apply_lora(model, cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["qwen3_moe_topk_norm", "mixtral_gqa_window",
                                  "gpt_oss_sinks_window"])
def test_peft_made_expert_adapters_import_with_peft_logits(name, tmp_path):
    """An adapter PEFT made on the experts (and q_proj), with random factors, loads into
    jaxft with PeftModel's logits."""
    import peft

    hf = saved(name, tmp_path / "base")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj"], target_parameters=list(EXPERT_WEIGHTS),
        init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = hf_models.padded_batch()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = jaxft.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, targets, routers", [
    ("qwen3_moe_top3_raw", "all-linear", True),
    ("qwen3_moe_topk_norm", ["q_proj", "gate", "gate_proj", "up_proj", "down_proj"], True),
    ("mixtral_gqa_window", "all-linear", True),
    ("gpt_oss_sinks_window", "all-linear", False),  # PEFT maps no gpt-oss names: attention
])
def test_peft_moe_targets_mean_what_peft_makes_of_them(name, targets, routers, tmp_path):
    """PEFT reads all-linear and the MLP's names on a mixture of experts as the experts (the
    fused gate_up_proj at twice the rank and alpha) and the router, and adapts no dense MLP:
    jaxft's adapters from the same targets are as many, a PEFT-made adapter imports with
    PeftModel's logits, and exported again it loads in PEFT with jaxft's."""
    import peft
    from flax import nnx

    from jaxft import lora
    from jaxft.hf import adapters

    hf = saved(name, tmp_path / "base")
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    made = jaxft.from_pretrained(tmp_path / "base")
    lora.apply_lora(made, lora.LoraConfig(rank=2, alpha=6.0, targets=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora.count_parameters(nnx.state(made, nnx.LoRAParam)) == trainable
    assert bool(lora.router_adapters(made)) == routers

    ids, mask = hf_models.padded_batch()
    real = mask.astype(bool)
    with torch.no_grad():
        want = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = jaxft.from_pretrained(tmp_path / "base", adapter=tmp_path / "peft")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)

    cfg = adapters.load_peft_adapter(jaxft.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    adapters.save_peft_adapter(model, cfg, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(
        hf_models.transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=torch.float32), tmp_path / "again").eval()
    with torch.no_grad():
        reloaded = again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(reloaded[real], got[real], atol=1e-4, rtol=0)


def test_expert_adapter_of_another_rank_layout_is_named(tmp_path):
    """lora_A rows must be experts × r: a file whose config says another rank is refused,
    naming the tensor and the shapes expected."""
    import peft

    hf = saved("qwen3_moe_topk_norm", tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"])).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 3}))
    with pytest.raises(JaxftError) as err:
        jaxft.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert ("base_model.model.model.layers.0.mlp.experts.lora_A.weight and lora_B have shapes "
            "(12, 32), (64, 12) but 6 experts of model.layers.0.mlp.experts.down_proj (32 in, "
            "64 out, r=3) need (18, 32), (64, 18)") in str(err.value)


@pytest.mark.slow
def test_expert_lora_run_resumes_exactly_and_exports_to_peft(tmp_path):
    """`jaxft.train` with adapters on the experts: the loss falls, a run resumed from its step-3
    checkpoint logs the uninterrupted run's losses, and `jaxft.export` writes an adapter that
    PeftModel loads with the run's logits."""
    import shutil
    import subprocess
    import sys

    import peft

    from jaxft import train
    from tests.tiny_run import (
        REPO,
        read_metrics,
        subprocess_env,
        tiny_config,
        tiny_model_dir,
        train_losses,
    )

    model_dir = tiny_model_dir(tmp_path / "model", "mixtral_gqa_window")
    overrides = {"train.steps": 6, "checkpoint.every": 3, "data.eval_fraction": 0.0,
                 "optim.lr": 1e-2, "lora.targets": ("q_proj",),
                 "lora.target_parameters": ",".join(EXPERT_WEIGHTS)}
    straight = tmp_path / "straight"
    train.run(tiny_config(model_dir, straight, **overrides))
    expected = train_losses(straight)
    assert expected[6] < expected[1] - 0.1
    logged = [m for m in read_metrics(straight) if "train_loss" in m]
    # the routing of each window: its aux loss, and the busiest and idlest experts' shares
    assert all(m["expert_load_max"] >= 1.0 >= m["expert_load_min"] >= 0.0 for m in logged)
    assert all(m["router_aux_loss"] > 0 for m in logged)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    train.run(tiny_config(model_dir, resumed, **overrides))
    assert train_losses(resumed) == expected

    done = subprocess.run([sys.executable, "-m", "jaxft.export", f"--workdir={straight}",
                           f"--out={tmp_path / 'adapter'}"], cwd=REPO, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids, mask = hf_models.padded_batch(vocab=50)
    hf = hf_models.transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                     dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = jaxft.from_pretrained(model_dir, adapter=tmp_path / "adapter")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)
