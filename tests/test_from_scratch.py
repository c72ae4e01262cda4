"""Training from scratch (`model.init=random`): the architecture of a `config.json` alone, its
weights drawn as transformers' `from_config` draws them, the tokenizer from `model.tokenizer`;
the run trains, logs its experts' loads, and exports a model transformers loads with jaxft's
logits and the tokenizer it trained with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxft import export, train
from jaxft.errors import JaxftError
from jaxft.hf import weights
from jaxft.hf.model import ModelOptions
from jaxft.workdir import load_run
from tests import hf_models
from tests.test_data_helpers import tiny_bpe
from tests.tiny_run import REPO, read_metrics, tiny_config

# A dense family and a mixture of experts, drawn at initializer_range 0.1 (not the default 0.02).
FAMILIES = ["llama_gqa_untied_llama3_rope", "qwen3_moe_topk_norm"]


def config_only(name: str, path: Path, **overrides) -> dict:
    """A directory holding nothing but a tiny model's config.json."""
    config = hf_models.CAUSAL_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return config


@pytest.mark.parametrize("name", FAMILIES)
def test_random_init_draws_every_tensor_as_transformers_from_config(name, tmp_path):
    """Each tensor jaxft initialises has the distribution of the one transformers'
    `from_config` initialises under the same name: norms at one, biases at zero, and every
    matrix normal with mean 0 and the same std (`initializer_range`), each kind of tensor
    pooled over the layers and experts and compared within five standard errors."""
    config = config_only(name, tmp_path / "config", initializer_range=0.1)
    model = weights.load_hf_model(tmp_path / "config", ModelOptions(random_init=True, seed=3))
    weights.save_pretrained(model, tmp_path / "jaxft")
    ours = safetensors.numpy.load_file(str(tmp_path / "jaxft" / "model.safetensors"))
    hf_models.build(config).save_pretrained(tmp_path / "transformers")  # the checkpoint names
    theirs = safetensors.numpy.load_file(str(tmp_path / "transformers" / "model.safetensors"))
    assert set(ours) == set(theirs)
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for key, value in ours.items():
        expected = theirs[key]
        if expected.ndim == 1 or np.all(expected == expected.flat[0]):  # norms, biases
            np.testing.assert_array_equal(value, expected, err_msg=key)
        else:
            pooled.setdefault(re.sub(r"\.\d+\.", ".N.", key), []).append((value, expected))
    assert pooled
    for kind, pairs in pooled.items():
        a = np.concatenate([v.ravel() for v, _ in pairs])
        b = np.concatenate([e.ravel() for _, e in pairs])
        sigma = 0.1
        assert abs(a.mean()) < 5 * sigma / np.sqrt(a.size), kind
        error = 5 * sigma * np.sqrt(1 / (2 * a.size) + 1 / (2 * b.size))
        assert abs(a.std() - b.std()) < error, (kind, a.std(), b.std())
        assert abs(b.std() - sigma) < error, (kind, b.std())  # the premise: transformers' draw

@pytest.mark.slow  # (a whole training run: the slow lane)
def test_random_init_reads_no_weights_and_follows_the_seed(tmp_path):
    """The directory has no weights at all; the same seed draws the same model, another seed
    another one."""
    config_only("qwen3_moe_topk_norm", tmp_path)
    draw = {seed: weights.load_hf_model(tmp_path, ModelOptions(random_init=True, seed=seed))
            for seed in (0, 1)}
    again = weights.load_hf_model(tmp_path, ModelOptions(random_init=True, seed=0))
    ids = jnp.asarray(hf_models.padded_batch()[0])
    np.testing.assert_array_equal(np.asarray(draw[0](ids)), np.asarray(again(ids)))
    assert not np.allclose(np.asarray(draw[0](ids)), np.asarray(draw[1](ids)))
    with pytest.raises(JaxftError, match="no weights found"):
        weights.load_hf_model(tmp_path)


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_from_scratch_moe_run_learns_and_exports_what_transformers_loads(tmp_path):
    """A tiny Qwen3-MoE from its config.json alone, trained in full with its load-balancing
    loss on the sample chats: the loss falls, the experts' loads are logged, and the export
    (weights + the tokenizer named by model.tokenizer) loads in transformers with the logits
    the run's own checkpoint gives in jaxft."""
    tokenizer_dir = tmp_path / "tokenizer"
    vocab = len(tiny_bpe(str(tokenizer_dir)))
    config_only("qwen3_moe_topk_norm", tmp_path / "model", vocab_size=vocab,
                initializer_range=0.02, output_router_logits=True, router_aux_loss_coef=0.01)
    cfg = tiny_config(tmp_path / "model", tmp_path / "run", **{
        "model.init": "random", "model.tokenizer": str(tokenizer_dir), "lora.enabled": False,
        "train.steps": 12, "optim.lr": 1e-2})
    train.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "run") if "train_loss" in m]
    assert logged[-1]["train_loss"] < logged[0]["train_loss"] - 0.5
    assert all(0 < m["expert_load_min"] <= 1 <= m["expert_load_max"] for m in logged)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["resolved_tokenizer"] == str(tokenizer_dir)

    export.export_workdir(tmp_path / "run", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = hf_models.padded_batch(vocab=vocab)
    with torch.no_grad():
        expected = reloaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = load_run(tmp_path / "run").model(jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"model.init": "zeros"},
     "config: model.init is 'zeros', expected one of pretrained, random"),
    ({"model.init": "random"},
     "config: model.init='random' trains from scratch, which LoRA cannot"),
])
def test_bad_init_is_one_line(overrides, message, tmp_path):
    config_only("llama_gqa_untied_llama3_rope", tmp_path / "model")
    with pytest.raises(JaxftError, match="^" + message.replace("(", r"\(")):
        train.run(tiny_config(tmp_path / "model", tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()



def test_moe_recipe_plans_the_model_transformers_builds_from_its_config(tmp_path):
    """configs/moe.py as shipped: its config.json is the model transformers instantiates
    (parameters counted on the meta device), every one of them trained."""
    import importlib.util

    from jaxft import plan

    spec = importlib.util.spec_from_file_location("moe_recipe", REPO / "configs" / "moe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = recipe.get_config()
    cfg.workdir = str(tmp_path / "run")
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(cfg.model.path))
    p = plan.make_plan(cfg)
    assert p.total_params == sum(t.numel() for t in reference.parameters())
    assert p.trainable_params == p.total_params
