"""Preference losses equal TRL's `DPOTrainer` on one batch: loss, rewards, log-probabilities and
the adapters' gradients, for every loss type jaxft ships.

TRL tokenizes and collates the pairs itself (its EOS, its completion mask); jaxft sees the same
tokens laid out as pairs [B, 2, T]. The adapter is a random non-zero PEFT adapter loaded into
both, and the reference is the base model with the adapter off in both (TRL's path for a new
adapter), so every reward is non-zero and every term of each loss is exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft import JaxftError, dpo, lora
from tests.adapter_grads import assert_lora_grads_equal
from tests.tiny_run import tiny_model_dir

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Where is my order?", "chosen": " It ships today from our warehouse.",
     "rejected": " No idea, sorry."},
    {"prompt": "How do I reset my password?", "chosen": " Use the reset link we email you.",
     "rejected": " You cannot."},
    {"prompt": "Can I change my address?", "chosen": " Yes, in your account settings.",
     "rejected": " Ask someone else about addresses and shipping."},
]
LOSSES = {  # name -> (jaxft DpoConfig, TRL loss_type, label_smoothing)
    "sigmoid": (dpo.DpoConfig(beta=0.5), "sigmoid", 0.0),
    "hinge": (dpo.DpoConfig(beta=0.5, loss_type="hinge"), "hinge", 0.0),
    "ipo": (dpo.DpoConfig(beta=0.5, loss_type="ipo"), "ipo", 0.0),
    "robust": (dpo.DpoConfig(beta=0.5, loss_type="robust", label_smoothing=0.2), "robust", 0.2),
}
TOL = dict(rtol=1e-4, atol=1e-6)


def trl_and_jaxft(model_dir, root, lora_config, seed: int):
    """TRL's trainer on `model_dir` with a random PEFT adapter (`lora_config`, B scaled up),
    TRL's collated batch, and jaxft's model with the same adapter."""
    import datasets
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float()
    torch.manual_seed(seed)
    policy = peft.get_peft_model(hf, lora_config)
    with torch.no_grad():  # rewards of order one: the log-ratios dwarf float32's rounding of
        for name, param in policy.named_parameters():  # the ~-60 sequence log-probabilities
            if "lora_B" in name:
                param.mul_(8.0)
    policy.save_pretrained(root / "adapter")
    args = trl.DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=len(PAIRS),
                         report_to=[], max_length=64, use_cpu=True, disable_dropout=True,
                         beta=0.5)
    trainer = trl.DPOTrainer(model=policy, args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    # An existing adapter makes TRL keep its initial copy as the reference ("ref"); without it
    # TRL's reference is the base with adapters off, as jaxft's is.
    trainer.model.delete_adapter("ref")
    batch = next(iter(trainer.get_train_dataloader()))
    model = jaxft.from_pretrained(model_dir, adapter=root / "adapter")
    return trainer, batch, model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with a random PEFT adapter, TRL's trainer on it, TRL's collated batch, and
    jaxft's model with the same adapter."""
    root = tmp_path_factory.mktemp("dpo")
    return trl_and_jaxft(tiny_model_dir(root / "base", "llama"), root, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM"), seed=1)


def pairs_from_trl(batch) -> dict[str, jax.Array]:
    """TRL's [chosen…, rejected…] rows as jaxft's pairs [B, 2, T], targets shifted by one."""
    ids = batch["input_ids"].numpy()
    attention = batch["attention_mask"].numpy()
    completion = batch["completion_mask"].numpy()
    n = ids.shape[0] // 2
    pair = lambda x: np.stack([x[:n], x[n:]], axis=1)  # noqa: E731
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    loss_mask = np.concatenate([completion[:, 1:], np.zeros_like(completion[:, :1])], axis=1)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return {"input_ids": pair(ids), "segment_ids": pair(attention), "positions": pair(positions),
            "targets": pair(targets), "loss_mask": pair(loss_mask)}


def trl_loss_and_grads(trainer, batch, loss_type, smoothing):
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = smoothing
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in trainer.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics, grads


def jaxft_loss_and_grads(model, cfg, pairs):
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    losses = dpo.preference_losses(cfg)
    batch = jax.tree.map(jnp.asarray, pairs)

    def mean_loss(adapters):
        sums = losses(nnx.merge(graphdef, adapters, rest), batch)
        return sums["loss_sum"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(adapters)
    return float(loss), sums, nnx.merge(graphdef, grads, rest)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_rewards_and_gradients_equal_trl(name, setup):
    trainer, batch, model = setup
    cfg, loss_type, smoothing = LOSSES[name]
    want_loss, want, want_grads = trl_loss_and_grads(trainer, batch, loss_type, smoothing)
    got_loss, sums, grads = jaxft_loss_and_grads(model, cfg, pairs_from_trl(batch))
    pairs = float(sums["count"])
    np.testing.assert_allclose(got_loss, want_loss, **TOL)
    for key, trl_name in dpo.METRICS.items():
        np.testing.assert_allclose(float(sums[key]) / pairs, want[trl_name], **TOL,
                                   err_msg=trl_name)
    assert abs(want["rewards/chosen"]) > 0.1  # the adapter moved the policy off the base
    # entries near cancellation are held to 1e-5 of the tensor's largest entry
    compared = assert_lora_grads_equal(grads, want_grads, rtol=1e-4, atol_of_largest=1e-5)
    assert compared == 2 * 3 * 2  # A and B of three projections in both layers


def test_full_fine_tuning_without_reference_log_probs_is_refused(setup):
    trainer, batch, _ = setup
    base = jaxft.from_pretrained(trainer.model.peft_config["default"].base_model_name_or_path)
    with pytest.raises(JaxftError, match=r"needs the batch's reference log-probabilities"):
        dpo.preference_losses(dpo.DpoConfig())(base, jax.tree.map(jnp.asarray,
                                                                  pairs_from_trl(batch)))


@pytest.mark.parametrize("fields, message", [
    (dict(beta=0.0), "dpo.beta must be positive, got 0.0"),
    (dict(loss_type="kto"), r"dpo.loss_type 'kto' unknown \(known: sigmoid, hinge, ipo, robust\)"),
    (dict(label_smoothing=0.1), "dpo.label_smoothing applies to loss_type 'robust'"),
    (dict(loss_type="robust", label_smoothing=0.5), r"must be in \[0, 0.5\)"),
])
def test_bad_preference_settings_are_one_line(fields, message):
    with pytest.raises(JaxftError, match=message):
        dpo.DpoConfig(**fields).check()


# ---------------------------------------------------------------------------------------------
# jaxft's preference data is TRL's: the same tokens, prompt boundary and truncation
# ---------------------------------------------------------------------------------------------


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}]}


def trl_sequences(model_dir, rows, max_length):
    """TRL's tokenized, collated pairs: per pair, (ids, completion mask) of chosen and
    rejected, padding removed."""
    import datasets
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    args = trl.DPOConfig(output_dir=str(model_dir / "trl"), report_to=[], use_cpu=True,
                         max_length=max_length)
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    n = len(examples)
    out = []
    for i in range(2 * n):
        keep = batch["attention_mask"][i].numpy().astype(bool)
        out.append((batch["input_ids"][i].numpy()[keep].tolist(),
                    batch["completion_mask"][i].numpy()[keep].tolist()))
    return [(out[p], out[n + p]) for p in range(n)]


def jaxft_sequences(model_dir, path, max_len, **data_fields):
    """jaxft's pairs from the same file, in file order: (ids, trained-token mask) of chosen and
    rejected, the loss mask shifted back onto the tokens it trains."""
    from jaxft import data

    cfg = data.default_config()
    cfg.train_path, cfg.eval_fraction, cfg.max_len = str(path), 0.0, max_len
    cfg.update(data_fields)
    bundle = data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=2,
                             task="dpo", process_index=0, process_count=1)
    pairs = []
    for batch in bundle.train.file_order():
        for row in np.flatnonzero(batch["valid"]):
            seqs = []
            for k in range(2):
                keep = batch["segment_ids"][row, k] > 0
                ids = batch["input_ids"][row, k][keep].tolist()
                trained = [0] + batch["loss_mask"][row, k][keep][:-1].astype(int).tolist()
                seqs.append((ids, trained))
            pairs.append(tuple(seqs))
    return pairs, bundle.stats


@pytest.mark.parametrize("layout, max_len", [("text", 24), ("conversational", 40)])
def test_pairs_tokenize_as_trl_tokenizes_them(layout, max_len, tmp_path):
    import json

    model_dir = tiny_model_dir(tmp_path / "model", "llama")
    rows = [conversational(p) for p in PAIRS] if layout == "conversational" else PAIRS
    rows = rows + [dict(rows[0], prompt=rows[0]["prompt"] * 3 if layout == "text" else
                        [{"role": "user", "content": PAIRS[0]["prompt"] * 3}])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = trl_sequences(model_dir, rows, max_length=max_len)  # cuts the long pairs' responses
    got, stats = jaxft_sequences(model_dir, path, max_len=max_len)
    assert got == want
    assert any(sum(mask) for (_, mask), _ in got)
    whole, _ = jaxft_sequences(model_dir, path, max_len=64)
    assert stats["truncated"] == sum(max(len(c[0]), len(r[0])) > max_len for c, r in whole) > 0


def test_implicit_prompt_is_the_shared_beginning_as_trl_extracts_it(tmp_path):
    import json

    model_dir = tiny_model_dir(tmp_path / "model", "llama")
    whole = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
             for p in PAIRS]
    whole += [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
              for c in map(conversational, PAIRS)]
    for name, rows in (("text", whole[:3]), ("conversational", whole[3:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        got, _ = jaxft_sequences(model_dir, path, max_len=64)
        assert got == trl_sequences(model_dir, rows, max_length=64), name


def test_long_prompts_keep_their_end_with_max_prompt_len(tmp_path):
    import json

    model_dir = tiny_model_dir(tmp_path / "model", "llama")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    full, _ = jaxft_sequences(model_dir, path, max_len=64)
    cut, stats = jaxft_sequences(model_dir, path, max_len=64, max_prompt_len=4)
    for (chosen, rejected), (c_cut, r_cut) in zip(full, cut, strict=True):
        for (ids, mask), (ids_cut, mask_cut) in ((chosen, c_cut), (rejected, r_cut)):
            prompt = mask.index(1)
            assert ids_cut == ids[prompt - 4:] and mask_cut == mask[prompt - 4:]
    assert stats["truncated"] == len(PAIRS)


# ---------------------------------------------------------------------------------------------
# Training: twenty LoRA DPO steps follow TRL's DPOTrainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_lora_dpo_steps_follow_trl(tmp_path):
    """`jaxft.train` with task='dpo' against `DPOTrainer.train()`: same base, same initial
    adapters (jaxft's A, B = 0), same eight pairs in every step, TRL's default optimizer and
    linear schedule, gradient clipping at 1."""
    import json

    import datasets
    import torch
    import transformers

    from jaxft import spec, train
    from tests.tiny_run import DATA, read_metrics, tiny_config

    steps, lr, targets = 20, 5e-3, ["q_proj", "v_proj", "down_proj"]
    rows = [json.loads(line) for line in
            (DATA / "support_preferences.jsonl").read_text().splitlines()[:8]]
    model_dir = tiny_model_dir(tmp_path / "model", "llama")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(model_dir, tmp_path / "run", task="dpo", **{
        "data.train_path": str(path), "data.eval_fraction": 0.0, "train.steps": steps,
        "train.batch_size": len(rows), "optim.lr": lr, "optim.schedule": "linear",
        "optim.final_lr_ratio": 0.0, "optim.clip_norm": 1.0, "lora.targets": tuple(targets),
        "lora.alpha": 8.0, "dpo.beta": 0.1})
    train.run(cfg)
    got = [m["train_loss"] for m in read_metrics(tmp_path / "run") if "train_loss" in m]

    model = jaxft.from_pretrained(model_dir)
    lora.apply_lora(model, spec.resolve(cfg).lora, seed=cfg.train.seed)
    init_a = {path: np.asarray(m.adapter.lora_a[...]) for path, m in lora.linear_modules(model)
              if m.adapter is not None}
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                         max_length=cfg.data.max_len, per_device_train_batch_size=len(rows),
                         max_steps=steps, learning_rate=lr, logging_steps=1, beta=0.1,
                         save_strategy="no", seed=0)
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir).float(), args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                    task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, module in trainer.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                hf_path = name.removeprefix("base_model.model.")
                layer, _, rest = hf_path.removeprefix("model.layers.").partition(".")
                a = init_a["model.layers." + rest][int(layer)]  # [in, r]
                module.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
    want = []
    compute_loss = trainer.compute_loss

    def recorded(*args, **kwargs):  # each step's loss as TRL computed it, unrounded
        loss = compute_loss(*args, **kwargs)
        want.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    assert len(want) == len(got) == steps
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert want[-1] < want[0] - 0.1  # the curve really moves


def test_moe_with_expert_adapters_adds_trls_aux_loss(tmp_path):
    """On a mixture of experts, TRL's DPO loss adds `router_aux_loss_coef` times the
    load-balancing loss over the batch's real tokens (whatever `output_router_logits` says),
    and its reference is the base with every adapter off, the experts' and the router's too:
    jaxft's loss, metrics and aux loss are TRL's."""
    model_dir = tiny_model_dir(tmp_path / "base", "qwen3_moe_topk_norm",
                               router_aux_loss_coef=0.5, output_router_logits=False)
    trainer, batch, model = trl_and_jaxft(model_dir, tmp_path, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                           "mlp.gate.weight"], task_type="CAUSAL_LM"), seed=2)
    want_loss, want, _ = trl_loss_and_grads(trainer, batch, "sigmoid", 0.0)
    assert lora.expert_adapters(model) and lora.router_adapters(model)
    got_loss, sums, _ = jaxft_loss_and_grads(model, dpo.DpoConfig(beta=0.5),
                                             pairs_from_trl(batch))
    got = dpo.metrics({key: np.asarray(value) for key, value in sums.items()})
    np.testing.assert_allclose(got_loss, want_loss, **TOL)
    np.testing.assert_allclose(got["aux_loss"], want["aux_loss"], **TOL)
    for name in dpo.METRICS.values():
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
    assert abs(want["rewards/chosen"]) > 0.1 and want["aux_loss"] > 0.5
