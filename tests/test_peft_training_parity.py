"""LoRA (and DoRA) training follows PyTorch+PEFT step for step from the same weights, adapters
and batches."""

import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jaxft
from jaxft import lora, optim, train_step
from jaxft.models import layers
from tests import hf_models
from tests.test_lora import take_step

STEPS, RANK, ALPHA, LR = 20, 4, 8.0, 1e-2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=LR, schedule="constant", warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, clip_norm=0.0, loraplus_lr_ratio=1.0))


def batches(seed=0, b=4, t=24, vocab=hf_models.VOCAB):
    """Two random batches, alternating: memorisable, so the loss really falls."""
    rng = np.random.RandomState(seed)
    pair = [rng.randint(1, vocab, (b, t)) for _ in range(2)]
    return [pair[i % 2] for i in range(STEPS)]


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_loss_curve_matches_peft(tmp_path, use_dora):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["llama_gqa_untied_llama3_rope"]())
    hf.save_pretrained(tmp_path)

    # jaxft
    model = jaxft.from_pretrained(tmp_path)
    cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, use_dora=use_dora)
    lora.apply_lora(model, cfg, seed=7)
    graphdef, trainable, dropout, frozen = nnx.split(model, lora.trainable_filter(cfg),
                                                     layers.DropoutKey, ...)
    init_a = {p: np.asarray(m.adapter.lora_a[...]) for p, m in lora.linear_modules(model)
              if m.adapter is not None}
    tx, _ = optim.make_optimizer(optim_config(), trainable, STEPS)
    opt_state = tx.init(trainable)
    step = jax.jit(train_step.make_train_step(graphdef, tx, task="lm"))
    jax_losses = []
    for i, ids in enumerate(batches()):
        mask = np.ones(ids.shape, np.float32)
        mask[:, -1] = 0
        batch = {"input_ids": ids.astype(np.int32), "targets": np.roll(ids, -1, 1).astype(np.int32),
                 "loss_mask": mask, "segment_ids": np.ones(ids.shape, np.int32),
                 "positions": np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(ids), 1))}
        trainable, opt_state, loss = take_step(step, trainable, frozen, dropout, opt_state,
                                               batch, i)
        jax_losses.append(loss)

    # PyTorch + PEFT, same base weights, same A (B = 0 in both), same batches
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                         target_modules=list(TARGETS),
                                                         use_dora=use_dora))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                hf_path = name.removeprefix("base_model.model.")
                layer, _, rest = hf_path.removeprefix("model.layers.").partition(".")
                a = init_a["model.layers." + rest][int(layer)]  # [in, r]
                module.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    torch_losses = []
    for ids in batches():
        ids = torch.from_numpy(ids)
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    assert torch_losses[-1] < torch_losses[0] - 0.3  # it really trains
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-3)
