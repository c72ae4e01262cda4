"""LoRA as a partition: fresh adapters change nothing, only adapters train, targets must match."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import jaxft
from jaxft import config, lora, optim, train_step
from jaxft.models import layers
from tests import hf_models


def load(tmp_path, name):
    if name == "bert_classifier":
        hf = hf_models.build(hf_models.bert_config(num_labels=3),
                             cls=transformers.BertForSequenceClassification)
    else:
        hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path)
    return jaxft.from_pretrained(tmp_path)


TARGETS = {"llama": ("q_proj", "v_proj", "gate_proj", "down_proj"), "gpt2": ("c_attn", "c_fc"),
           "qwen2_bias_tied": "all-linear", "bert_classifier": ("query", "value")}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fresh_adapters_leave_logits_bitwise_equal(name, tmp_path):
    model = load(tmp_path, name)
    ids, mask = hf_models.padded_batch()
    before = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets=TARGETS[name], dropout=0.1))
    model.eval()
    after = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.array_equal(before, after)


def test_trainable_fraction_is_what_the_rank_predicts(tmp_path):
    model = load(tmp_path, "llama")  # hidden 64, intermediate 96, 4 heads of 16, 2 layers
    cfg = lora.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"),
                          rank_pattern=(("down_proj", 2),))
    lora.apply_lora(model, cfg)
    trainable, total = lora.log_trainable(model, cfg)
    per_layer = 4 * (64 + 64) + 4 * (64 + 64) + 2 * (96 + 64)
    assert trainable == 2 * per_layer
    base = hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]()).num_parameters()
    assert total == base + trainable


def test_target_that_matches_nothing_is_refused(tmp_path):
    model = load(tmp_path, "gpt2")
    with pytest.raises(jaxft.JaxftError, match=r"lora target 'q_proj' matches no module of this "
                       r"gpt2 model"):
        lora.apply_lora(model, lora.LoraConfig(targets=("c_attn", "q_proj")))
    with pytest.raises(jaxft.JaxftError, match=r"match no module .*its projections: c_attn, "
                       r"c_fc, c_proj"):
        lora.apply_lora(model, lora.LoraConfig(targets=("query",)))


def test_targets_match_per_layer_hf_names(tmp_path):
    model = load(tmp_path, "llama")
    lora.apply_lora(model, lora.LoraConfig(targets=r"model\.layers\.\d+\.self_attn\.(q|k)_proj"))
    adapted = [p for p, m in lora.linear_modules(model) if m.adapter is not None]
    assert sorted(adapted) == ["model.layers.self_attn.k_proj", "model.layers.self_attn.q_proj"]
    with pytest.raises(jaxft.JaxftError, match="select only some layers"):
        lora.apply_lora(load(tmp_path, "llama"),
                        lora.LoraConfig(targets=r"model\.layers\.0\.self_attn\.q_proj"))
    # Names in a list follow PEFT's suffix rule over the per-layer names, as regexes do.
    with pytest.raises(jaxft.JaxftError, match="select only some layers"):
        lora.apply_lora(load(tmp_path, "llama"),
                        lora.LoraConfig(targets=("layers.1.self_attn.q_proj",)))
    model = lora.apply_lora(load(tmp_path, "llama"),
                            lora.LoraConfig(targets=("self_attn.v_proj", "down_proj")))
    adapted = [p for p, m in lora.linear_modules(model) if m.adapter is not None]
    assert sorted(adapted) == ["model.layers.mlp.down_proj", "model.layers.self_attn.v_proj"]


def take_step(step, trainable, frozen, dropout, opt_state, batch, number):
    """One `make_train_step` step from an empty window: (trainable, opt_state, its loss)."""
    trainable, opt_state, window = step(trainable, frozen, dropout, opt_state,
                                        train_step.zero_window("lm"), batch, number)
    return trainable, opt_state, float(window["loss_sum"] / window["count"])


def _batch(rng, b=4, t=16, vocab=128):
    ids = rng.randint(1, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def test_only_adapters_train_and_hold_optimizer_state(tmp_path):
    model = load(tmp_path, "llama")
    cfg = lora.LoraConfig(rank=4, targets="all-linear", dropout=0.1)
    lora.apply_lora(model, cfg)
    graphdef, trainable, dropout, frozen = nnx.split(model, lora.trainable_filter(cfg),
                                                     layers.DropoutKey, ...)
    frozen_before = jax.tree.map(np.asarray, frozen)
    tx, _ = optim.make_optimizer(config.base_config().optim, trainable, 10)
    opt_state = tx.init(trainable)
    trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    # AdamW: first and second moments of each adapter array, plus a few step counters.
    assert 2 * trainable_bytes <= opt_bytes <= 2 * trainable_bytes + 64
    step = jax.jit(train_step.make_train_step(graphdef, tx, task="lm"))
    rng = np.random.RandomState(0)
    b_before = np.asarray(model.model.layers.self_attn.q_proj.adapter.lora_b[...])
    for i in range(3):
        trainable, opt_state, _ = take_step(step, trainable, frozen, dropout, opt_state,
                                            _batch(rng), i)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)
    nnx.update(model, trainable)
    assert not np.array_equal(b_before, model.model.layers.self_attn.q_proj.adapter.lora_b[...])


def test_micro_batches_equal_the_full_batch(tmp_path):
    model = load(tmp_path, "llama")
    cfg = lora.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    lora.apply_lora(model, cfg)
    model.model.layers.self_attn.q_proj.adapter.lora_b[...] = 0.1  # non-zero gradients for A
    graphdef, trainable, dropout, frozen = nnx.split(model, lora.trainable_filter(cfg),
                                                     layers.DropoutKey, ...)
    tx = optax.sgd(1.0)
    batch = _batch(np.random.RandomState(3), b=8)
    batch["loss_mask"][:2, 5:] = 0  # uneven token counts across micro-batches
    results = []
    for accum in (1, 4):
        step = jax.jit(train_step.make_train_step(graphdef, tx, task="lm", accum_steps=accum))
        new, _, loss = take_step(step, trainable, frozen, dropout, tx.init(trainable), batch, 0)
        results.append((jax.tree.map(np.asarray, new), loss))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0],
                 results[1][0])
