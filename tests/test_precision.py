"""The precision policy: parameter, compute and optimizer-state dtypes are separate choices.

Checked against the float32 run of the same steps: a smaller dtype must change memory by the
factor it promises and stay close to float32's losses, never silently diverge.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft import config, lora, optim, train, train_step
from jaxft.models import layers
from tests import hf_models
from tests.test_lora import _batch, take_step
from tests.tiny_run import tiny_config, tiny_model_dir
from tests.tiny_run import train_losses as run_losses

STEPS = 6


def llama_dir(tmp_path):
    hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]()).save_pretrained(tmp_path)
    return tmp_path


def train_losses(model, lora_cfg, state_dtype):
    graphdef, trainable, dropout, frozen = nnx.split(model, lora.trainable_filter(lora_cfg),
                                                     layers.DropoutKey, ...)
    optim_cfg = config.base_config().optim
    optim_cfg.update(dict(lr=1e-3, warmup_steps=0, schedule="constant"))
    tx, _ = optim.make_optimizer(optim_cfg, trainable, STEPS, state_dtype=state_dtype)
    opt_state = tx.init(trainable)
    step = jax.jit(train_step.make_train_step(graphdef, tx, task="lm"))
    batch, losses = _batch(np.random.RandomState(0)), []  # one batch, learnt by heart
    for i in range(STEPS):
        trainable, opt_state, loss = take_step(step, trainable, frozen, dropout, opt_state,
                                               batch, i)
        losses.append(loss)
    return np.array(losses), trainable, opt_state


@pytest.mark.slow
def test_bfloat16_optimizer_state_halves_it_and_tracks_float32(tmp_path):
    path = llama_dir(tmp_path)
    ref_losses, trainable, ref_state = train_losses(jaxft.from_pretrained(path), None, "float32")
    losses, _, state = train_losses(jaxft.from_pretrained(path), None, "bfloat16")

    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))  # weights stay fp32
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim > 0)  # noqa: E731
    assert nbytes(state) * 2 == nbytes(ref_state)
    assert losses[-1] < losses[0] - 0.1  # it trains
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-3)


@pytest.mark.slow
def test_lora_on_a_bfloat16_base_keeps_float32_adapters(tmp_path):
    path = llama_dir(tmp_path)
    lora_cfg = lora.LoraConfig(rank=4, targets="all-linear")
    ref_model = lora.apply_lora(jaxft.from_pretrained(path), lora_cfg)
    model = lora.apply_lora(jaxft.from_pretrained(path, dtype="bfloat16"), lora_cfg)

    adapters = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    base = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert all(x.dtype == jnp.float32 for x in adapters)
    assert all(x.dtype == jnp.bfloat16 for x in base)
    ref_losses, *_ = train_losses(ref_model, lora_cfg, "float32")
    losses, *_ = train_losses(model, lora_cfg, "float32")
    assert losses[-1] < losses[0] - 0.1
    # bfloat16 weights carry 8 bits of mantissa: logits of scale ~1 move by ~1e-2.
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_training_run_with_the_smallest_policy(tmp_path):
    """bfloat16 weights, compute and optimizer state through `jaxft.train` (on CPU, where
    bfloat16 is slow but exact enough to learn)."""
    model_dir = tiny_model_dir(tmp_path / "model")
    workdir = tmp_path / "run"
    train.run(tiny_config(model_dir, workdir, **{
        "train.param_dtype": "bfloat16", "train.compute_dtype": "bfloat16",
        "train.optimizer_state_dtype": "bfloat16", "train.steps": 8, "lora.enabled": False}))
    losses = list(run_losses(workdir).values())
    assert len(losses) == 8 and np.isfinite(losses).all() and losses[-1] < losses[0]
