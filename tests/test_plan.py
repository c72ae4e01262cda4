"""The dry run: its numbers against a real run's buffers, an 8B config it must only compile,
and the `--dry_run` command that reads neither weights nor data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

import jaxft
from jaxft import checkpoint, plan, train
from jaxft.hf import weights
from jaxft.plan import array_bytes
from tests.tiny_run import subprocess_env, tiny_config, tiny_model_dir, write_config_file

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

# Llama-3-8B's config.json, as the hub serves it (sizes only: this test never sees a weight).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_8B_PARAMS = 8_030_261_248  # published; the planner counts it from the shapes
LLAMA3_8B_LORA_R8_ALL = 20_971_520  # what PEFT reports for r=8 on all seven projections


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # One layer: XLA's cost analysis counts a scanned layer body once, so with a single layer
    # its FLOPs are the whole step's and can check the analytic count.
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_plan_matches_the_buffers_of_a_real_run(mode, llama_dir, tmp_path, monkeypatch):
    cfg = tiny_config(llama_dir, tmp_path, **{"train.steps": 1, "mesh.fsdp": 2,
                                              "lora.enabled": mode == "lora"})
    p = plan.make_plan(cfg)

    # The real run hands its placed trainable parameters and optimizer state to the
    # checkpointer at the end: measure exactly those arrays, shard by shard.
    seen = {}
    save = checkpoint.Checkpoints.save

    def measuring_save(self, step, state, meta):
        seen.update({k: array_bytes(v) for k, v in state.items()},
                    params=sum(x.size for x in jax.tree.leaves(state["trainable"])))
        return save(self, step, state, meta)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", measuring_save)
    train.run(cfg)
    assert (tmp_path / "metrics.png").is_file()  # the run plotted its curves at the end
    assert p.trainable == seen["trainable"]  # total and per device, to the byte
    assert p.opt_state == seen["opt_state"]
    assert p.trainable_params == seen["params"]

    base = weights.load_hf_model(llama_dir)
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    base_count = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert p.total_params - p.adapter_params == base_count
    if mode == "lora":
        assert p.frozen.total == base_bytes and p.trainable_params == p.adapter_params
    else:
        assert p.trainable.total == base_bytes and p.frozen.total == 0
    # AdamW holds m and v for each trainable array, plus a few scalar step counters.
    assert 2 * p.trainable.total <= p.opt_state.total <= 2 * p.trainable.total + 64
    # XLA's argument buffers are these arrays' shards plus the batch (less the inputs the
    # step never reads, which jit prunes).
    held = p.trainable.per_device + p.frozen.per_device + p.opt_state.per_device
    assert held < p.memory["argument"] <= held + p.batch.per_device
    assert p.memory["alias"] > 0 and p.memory["temp"] > 0  # donation took; activations exist
    assert p.peak_bytes > p.memory["argument"]
    # With one layer, XLA counts the whole step: the analytic count is within 20% of it.
    xla_total = p.xla_flops * p.devices
    assert 0.8 < p.analytic_flops / xla_total < 1.2, (p.analytic_flops, xla_total)


# Qwen3-30B-A3B's config.json as released: 48 layers of 128 experts, 8 routed per token.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


def test_qwen3_30b_a3b_counts_transformers_parameters_and_the_active_ones(tmp_path):
    """The released MoE config, planned on 8 host devices: its parameters are exactly those of
    transformers' model of the same config (built on the meta device, no memory), and the
    active ones leave out the 120 experts per layer a token is not routed to."""
    import torch
    import transformers

    model_dir = tmp_path / "qwen3-30b-a3b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(model_dir))
    expected = sum(p.numel() for p in reference.parameters())
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": 8, "data.max_len": 128, "train.batch_size": 8,
        "lora.targets": "all-linear", "train.param_dtype": "bfloat16",
        "data.train_path": str(tmp_path / "no-data-needed.jsonl")})
    p = plan.make_plan(cfg)
    assert p.total_params - p.adapter_params == expected == 30_532_122_624
    idle_experts = 48 * (128 - 8) * 3 * 2048 * 768
    assert p.active_params == p.total_params - idle_experts
    assert f"base model 30,532,122,624, {p.active_params:,} active per token" in \
        plan.describe(p)


# gpt-oss-20b's config.json as released: 24 layers of 32 experts, 4 routed per token, its
# experts in MXFP4 (which loading dequantizes: the model's parameters are the float ones).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 201088}


def test_gpt_oss_20b_counts_transformers_parameters_and_the_active_ones(tmp_path):
    """gpt-oss-20b's parameters (biases, sinks and router biases included) are exactly those of
    transformers' model of its config, and a token meets all but 28 of each layer's 32
    experts: 4.19 B, which is OpenAI's 3.61 B active plus the 0.58 B embedding table."""
    import torch
    import transformers

    from jaxft.hf.model import blueprint
    from jaxft.plan import dry_run

    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_20B))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(tmp_path))
    expected = sum(p.numel() for p in reference.parameters())
    model = blueprint(GPT_OSS_20B, "config.json")
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model.abstract(), nnx.Param)))
    assert total == expected == 20_914_757_184
    per_expert = 3 * 2880 * 2880 + 2 * 2880 + 2880  # gate, up, down and their biases
    active = dry_run._active_params(model.config, total)
    assert active == total - 24 * (32 - 4) * per_expert == 4_187_440_704
    assert round(active - 201088 * 2880, -7) == 3_610_000_000  # OpenAI's model card


def test_llama3_8b_plans_from_config_json_alone(tmp_path):
    """8B on 8 host devices with fsdp=8: lowered and compiled, never allocated. Sequence length
    256 keeps the CPU compile to seconds; the parameter numbers do not depend on it."""
    model_dir = tmp_path / "llama3-8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": 8, "data.max_len": 256, "train.batch_size": 8,
        "lora.rank": 8, "train.param_dtype": "bfloat16", "train.compute_dtype": "bfloat16",
        "data.train_path": str(tmp_path / "no-data-needed.jsonl")})
    live_before = sum(x.nbytes for x in jax.live_arrays())
    p = plan.make_plan(cfg)
    assert sum(x.nbytes for x in jax.live_arrays()) - live_before < 2**20  # nothing allocated
    assert not (tmp_path / "run").exists()

    assert p.total_params - p.adapter_params == LLAMA3_8B_PARAMS
    assert p.trainable_params == p.adapter_params == LLAMA3_8B_LORA_R8_ALL
    assert p.trainable.total == 4 * LLAMA3_8B_LORA_R8_ALL  # float32 adapters on a bfloat16 base
    assert p.frozen.total == 2 * LLAMA3_8B_PARAMS
    # fsdp=8 splits every matrix along its model dimension; only the norms stay whole.
    norms = 2 * 4096 * (2 * 32 + 1)
    assert p.frozen.per_device == (p.frozen.total - norms) // 8 + norms
    assert 2 * p.trainable.total <= p.opt_state.total <= 2 * p.trainable.total + 64
    held = p.trainable.per_device + p.frozen.per_device + p.opt_state.per_device
    assert held < p.memory["argument"] <= held + p.batch.per_device
    tokens = 8 * 256
    matmuls = LLAMA3_8B_PARAMS - 128256 * 4096 - 65 * 4096  # less the embedding and norms
    assert math.isclose(p.analytic_flops, tokens * (4 * matmuls + 6 * LLAMA3_8B_LORA_R8_ALL
                                                    + 3 * 4 * 256 * 4096 * 32))
    text = plan.describe(p)
    assert "20,971,520 trainable" in text and "base model 8,030,261,248" in text
    # the verdict on this machine: an eighth of its RAM (the kernel's MemTotal) per device,
    # unless a container's limit is lower
    ram = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    limits = [int(value) for f in ("/sys/fs/cgroup/memory.max",
                                  "/sys/fs/cgroup/memory/memory.limit_in_bytes")
              if Path(f).is_file() and (value := Path(f).read_text().strip()).isdigit()]
    usable = min([ram, *limits]) // 8
    verdict = "fits" if p.peak_bytes <= usable else "does not fit"
    assert (f"peak ≈ {plan.human_bytes(p.peak_bytes)} of {plan.human_bytes(usable)} usable "
            f"RAM per device: {verdict}") in text


# Released config.json files of the newer families (sizes and the fields that shape them).
RELEASED = {
    "Qwen3-0.6B": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 40960, "tie_word_embeddings": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28},
    "Phi-3.5-mini": {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "sliding_window": 262144, "tie_word_embeddings": False, "pad_token_id": 32000,
        "eos_token_id": 32000, "bos_token_id": 1,
        "rope_scaling": {"type": "longrope", "short_factor": [1.05] * 48,
                         "long_factor": [1.8] * 48}},
    "gemma-2-2b": {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "rope_theta": 10000.0,
        "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma-3-1b": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
        "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 32768},
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_family_configs_plan_from_config_json_alone(name, tmp_path):
    """The dry run of each newer family from its config.json alone: the base model has the
    parameters transformers instantiates for that config (on the meta device: no memory), and
    the step compiles for 8 devices."""
    import torch
    import transformers

    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(RELEASED[name]))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(model_dir))
    expected = sum(p.numel() for p in reference.parameters())  # a tied head counted once
    cfg = tiny_config(model_dir, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": 8, "data.max_len": 128, "train.batch_size": 8,
        "lora.targets": "all-linear", "train.param_dtype": "bfloat16",
        "train.compute_dtype": "bfloat16", "data.train_path": str(tmp_path / "none.jsonl")})
    p = plan.make_plan(cfg)
    assert p.total_params - p.adapter_params == expected
    assert p.adapter_params > 0 and p.memory["argument"] > 0
    assert not (tmp_path / "run").exists()


def test_dry_run_command_needs_no_weights_tokenizer_or_data(tmp_path):
    """`--dry_run` on a directory holding only a BERT config.json, for classification with
    num_labels unset (2 is assumed) and a data path that does not exist."""
    model_dir = tiny_model_dir(tmp_path / "full", "bert")
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    config_file = write_config_file(tmp_path / "cfg.py", only_config, tmp_path / "run", **{
        "task": "classification", "lora.targets": ("query", "value"),
        "lora.modules_to_save": ("classifier",),
        "data.train_path": str(tmp_path / "missing.csv")})
    result = subprocess.run(
        [sys.executable, "-m", "jaxft.train", f"--config={config_file}", "--dry_run"],
        capture_output=True, text=True, env=subprocess_env(8), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("dry run: bert from ")
    assert "XLA memory per device" in out and "FLOPs per step" in out
    assert "mesh data 8 × fsdp 1 × tensor 1 (8 cpu devices)" in out
    assert not (tmp_path / "run").exists()  # nothing written, no run started


@pytest.mark.parametrize("path, message", [
    ("{tmp}/nowhere", r"nowhere: no such file or directory$"),
    ("no-such-org/no-such-model", r"^no-such-org/no-such-model: not a local path, and fetching "
     r"its config.json from the hub failed: \w+"),
])
def test_unknown_model_is_one_line(tmp_path, path, message):
    cfg = tiny_config(path.format(tmp=tmp_path), tmp_path / "run")
    with pytest.raises(jaxft.JaxftError, match=message) as e:
        plan.make_plan(cfg)
    assert "\n" not in str(e.value)
