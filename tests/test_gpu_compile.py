"""GPUs without a GPU: XLA:GPU compiles jaxft's programs for NVIDIA cards described as data, and
the dry run's verdict is its figure against what JAX lets a program use of the card.

Every compile here runs XLA:GPU's real compiler (JAX's CUDA plugin) on this CPU machine, for
compile-only devices (`jaxft.plan.gpu`); skipped where the plugin is not installed (the
`gpu-plan` extra).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxft
from jaxft import generate, plan, sharding, spec, train_step
from jaxft.hf.model import ModelOptions, model_config
from jaxft.models import attention
from jaxft.plan import dry_run, gpu, suggest
from tests.test_tpu_compile import config_dir
from tests.tiny_run import REPO, subprocess_env, tiny_config

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                                 reason="needs JAX's CUDA plugin: pip install -e '.[gpu-plan]'"),
              pytest.mark.slow]  # (see the README: the -m 'not slow' lane)

ROOT = Path(__file__).resolve().parents[1]
CUDNN = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return config_dir(tmp_path_factory.mktemp("small-llama"))


def gpu_config(model_dir: Path, tmp_path: Path, **overrides):
    return tiny_config(model_dir, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": -1, "data.max_len": 256, "train.batch_size": 4,
        "train.param_dtype": "bfloat16", "train.compute_dtype": "auto",
        "data.train_path": str(tmp_path / "no-data-needed.jsonl"), **overrides})


def compiled_step(cfg, topology: gpu.GpuTopology):
    """The train step `cfg` describes, as `jaxft.train` builds it, compiled by XLA:GPU for
    `topology` on abstract inputs (what the dry run compiles)."""
    run = spec.resolve(cfg, topology.devices)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                              devices=list(topology.devices))
    _, model = dry_run.configured_model(run)
    step, states = train_step.build(model, run, mesh)
    placed = step.place(states)
    window, number = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step.replicated),
        (train_step.zero_window(run.task), train_step.step_number(0)))
    lowered = step.train.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                               placed["opt_state"], window, dry_run.abstract_batch(run, mesh),
                               number)
    compiled, _ = topology.compile(lowered)
    return run, compiled


def custom_calls(compiled) -> set[str]:
    return set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))


# ---------------------------------------------------------------------------------------------
# Cards by name
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(gpu.CARDS))
def test_every_card_compiles_as_its_description_says(name):
    """Each card jaxft ships becomes compile-only devices of its own kind and memory, for which
    XLA:GPU compiles (a matmul here), and the usable share is JAX's allocator's 75%."""
    topology = gpu.topology(f"{name}x2")
    text = (gpu.SPECS / f"{gpu.CARDS[name].spec}.txtpb").read_text()
    memory = int(re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.M).group(1))
    assert topology.num_devices == 2 and topology.shape == "1x1x2"
    assert topology.memory_bytes == memory and topology.usable_bytes() == int(0.75 * memory)
    assert topology.devices[0].device_kind and topology.devices[0].platform == "gpu"
    one = NamedSharding(jax.sharding.Mesh(np.asarray(topology.devices[:1]), ("x",)),
                        PartitionSpec())
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=one)
    compiled, _ = topology.compile(jax.jit(lambda a, b: a @ b).lower(x, x))
    assert compiled.memory_analysis().argument_size_in_bytes == 2 * 256 * 256 * 2


def test_every_card_name_is_taken_for_a_gpu():
    """`--topology` reads each card's name (and n of them) as GPUs, names that end in digits
    after an x included (`rtx4090`, `rtx3060`), and a TPU slice's as a TPU's."""
    for name in gpu.CARDS:
        assert gpu.looks_like_gpu(name) and gpu.looks_like_gpu(f"{name}x2"), name
    assert not gpu.looks_like_gpu("v5e-8") and not gpu.looks_like_gpu("rtx9999")


def test_memory_fraction_is_the_environments(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    topology = gpu.topology("l4")
    assert topology.usable_bytes() == int(0.9 * topology.memory_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(jaxft.JaxftError, match=r"^XLA_PYTHON_CLIENT_MEM_FRACTION is '1.5', "
                       r"expected a number in \(0, 1\]$"):
        topology.usable_bytes()


def test_eight_and_sixteen_gpus_are_one_and_two_hosts():
    assert gpu.topology("h100x8").shape == "1x1x8"
    sixteen = gpu.topology("h100x16")
    assert sixteen.shape == "1x2x8" and {d.process_index for d in sixteen.devices} == {0, 1}


# ---------------------------------------------------------------------------------------------
# Every GPU kernel compiles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {}, {"lora.enabled": False}, {"lora.base_quant": "nf4", "lora.double_quant": True},
    {"lora.use_dora": True}, {"mesh.tensor": 2}, {"train.remat": "full"}],
    ids=["lora", "full", "qlora", "dora", "tensor", "remat"])
def test_train_steps_compile_with_cudnn_attention_on_two_h100s(overrides, small, tmp_path):
    """LoRA, full, QLoRA, DoRA, tensor-parallel and rematerialised steps of a grouped-query
    Llama over two H100s: XLA:GPU compiles them with cuDNN's fused attention, forward and
    backward, its inputs sharded alike (cuDNN's partitioner refuses q, k and v sharded apart)."""
    run, compiled = compiled_step(gpu_config(small, tmp_path, **overrides),
                                  gpu.topology("h100x2"))
    assert run.platform == "gpu" and run.compute_dtype == "bfloat16"
    assert set(CUDNN) <= custom_calls(compiled)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_dpo_and_classifier_steps_compile_for_an_h100(small, tmp_path):
    """A DPO step (pairs, the reference as the base with adapters off) and a BERT classifier's
    bidirectional step, each with cuDNN's attention (BERT's attention dropout off here: dropped
    probabilities take the XLA path, as no fused kernel drops them)."""
    _, dpo = compiled_step(gpu_config(small, tmp_path, task="dpo"), gpu.topology("h100"))
    assert set(CUDNN) <= custom_calls(dpo)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 1024,
        "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 256, "max_position_embeddings": 512, "type_vocab_size": 2,
        "attention_probs_dropout_prob": 0.0}))
    _, classifier = compiled_step(gpu_config(bert, tmp_path, task="classification", **{
        "lora.targets": ("query", "value"), "lora.modules_to_save": ("classifier",),
        "model.num_labels": 3, "data.max_len": 128}), gpu.topology("h100"))
    assert CUDNN[0] in custom_calls(classifier)


def test_soft_capped_attention_takes_xla_on_a_gpu_and_says_so(tmp_path, caplog):
    """Gemma 2 caps its attention scores, which cuDNN cannot: its step compiles for an H100
    with the XLA path, and says so in one line."""
    gemma = tmp_path / "gemma2"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 1024,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "query_pre_attn_scalar": 64, "sliding_window": 64, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 512}))
    attention._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        _, compiled = compiled_step(gpu_config(gemma, tmp_path), gpu.topology("h100"))
    assert not set(CUDNN) & custom_calls(compiled)
    assert any("cuDNN attention cannot cap attention scores" in r.getMessage()
               for r in caplog.records)


def test_cudnn_attention_with_packed_rows_and_grouped_heads_compiles(tmp_path):
    """The attention call alone, as the families make it: packed segments (a mask from segment
    ids and positions), 8 query heads over 2 key/value heads, a sliding window, traced under
    a (1, 2, 2) mesh of H100s; and a head dim cuDNN cannot take on every card (256) falls back
    to XLA with one line."""
    topology = gpu.topology("h100x4")
    mesh = sharding.make_mesh(1, 2, 2, devices=list(topology.devices))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    b, t = 4, 256

    def call(q, k, v, segments, positions):
        mask = attention.attention_mask(segments, segments, positions, positions, causal=True,
                                        sliding_window=64)
        out = attention.dot_product_attention(q, k, v, mask, q.shape[-1] ** -0.5, causal=True,
                                              segment_ids=segments)
        return out.astype(jnp.float32).sum()

    def compiled(head_dim):
        shaped = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dtype, sharding=rows)
        args = (shaped((b, t, 8, head_dim)), shaped((b, t, 2, head_dim)),
                shaped((b, t, 2, head_dim)), shaped((b, t), jnp.int32),
                shaped((b, t), jnp.int32))
        grad = jax.jit(sharding.traced_under(mesh, jax.grad(call, argnums=(0, 1, 2))))
        return topology.compile(grad.lower(*args))[0]

    assert set(CUDNN) <= custom_calls(compiled(64))
    attention._log_fallback_once.cache_clear()
    assert not set(CUDNN) & custom_calls(compiled(256))


def test_generation_compiles_for_an_h100(small):
    """Generation's one program (prefill, then the decode loop over the KV cache)."""
    topology = gpu.topology("h100")
    on_gpu = NamedSharding(jax.sharding.Mesh(np.asarray(topology.devices), ("one",)),
                           PartitionSpec())

    def shaped(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_gpu)

    family, cfg = model_config(json.loads((small / "config.json").read_text()), str(small),
                               ModelOptions(compute_dtype="bfloat16"))
    from flax import nnx

    model = nnx.eval_shape(lambda: family.Model(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: shaped(x.shape, x.dtype), state)
    lowered = generate._generate.lower(
        graphdef, state, shaped((2, 16), jnp.int32), shaped((2, 16), jnp.int32),
        shaped((1,), jnp.int32), shaped((), jnp.int32), shaped((2,), jnp.uint32),
        shaped((), jnp.float32), shaped((), jnp.int32), shaped((), jnp.float32),
        max_new_tokens=8, cache_length=24, greedy=True)
    assert topology.compile(lowered)[0].memory_analysis() is not None


# ---------------------------------------------------------------------------------------------
# The dry run and --suggest for GPUs
# ---------------------------------------------------------------------------------------------


def test_dry_run_for_an_h100_is_xla_gpus_own_memory_analysis(small, tmp_path, capsys):
    """`--dry_run --topology=h100`: the plan's per-GPU peak is memory_analysis() of the step
    compiled independently for the same card, and the verdict is against 75% of its memory."""
    cfg = gpu_config(small, tmp_path)
    p = plan.print_plan(cfg, "h100")
    _, compiled = compiled_step(gpu_config(small, tmp_path), gpu.topology("h100"))
    m = compiled.memory_analysis()
    xla_peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    assert abs(p.peak_bytes - xla_peak) <= 0.05 * xla_peak
    text = capsys.readouterr().out
    assert "compiled by XLA:GPU on this host (no GPU needed)" in text
    assert (f"peak ≈ {plan.human_bytes(p.peak_bytes)} of 59.33 GiB usable memory per GPU: "
            "fits") in text
    assert "989 TFLOP/s per GPU" in text and p.capacity == int(0.75 * 84942979072)


def test_laptop_verdicts_are_the_compilers(tmp_path):
    """The README's laptop row from the command line: Llama-2-7B, LoRA rank 16, 1 × 2048 tokens,
    remat full, on an 8 GB laptop GPU: an NF4 base (`configs/qlora.py`) fits, a bfloat16 one
    (`configs/lora.py`) does not, with XLA:GPU's own warning."""
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_fit import LLAMA_2_7B

    model_dir = tmp_path / "llama-2-7b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_2_7B))
    common = [f"--config.model.path={model_dir}", "--config.train.batch_size=1",
              "--config.data.max_len=2048", "--config.train.param_dtype=bfloat16",
              "--config.lora.rank=16", "--config.lora.alpha=32", "--config.train.remat=full",
              "--dry_run", "--topology=rtx4060-laptop"]
    verdicts = {}
    for recipe in ("qlora", "lora"):
        done = subprocess.run([sys.executable, "-m", "jaxft.train",
                               f"--config=configs/{recipe}.py", *common], cwd=REPO,
                              env=subprocess_env(1), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        verdicts[recipe] = re.search(r"usable memory per GPU: (.*)$", done.stdout,
                                     re.M).group(1)
        if recipe == "lora":
            assert "XLA:GPU warned: The byte size of input/output arguments" in done.stdout
    assert verdicts["qlora"].startswith("fits")
    assert verdicts["lora"].startswith("does not fit (needs")


def test_suggest_for_eight_h100s_prints_a_ready_command(small, tmp_path):
    cfg = gpu_config(small, tmp_path, **{"train.batch_size": 8})
    topology = gpu.topology("h100x8")
    trials = suggest.search(cfg, topology, max_compiles=4, progress=lambda line: None)
    text = suggest.describe(trials, topology, ["train.py", "--config=c.py", "--dry_run",
                                               "--topology=h100x8", "--suggest"])
    assert "compiled by XLA:GPU" in text and "memory/GPU" in text
    assert text.splitlines()[-1].strip().startswith(
        "python -m jaxft.train --config=c.py --config.mesh.data=")


# ---------------------------------------------------------------------------------------------
# Bad input: one line each
# ---------------------------------------------------------------------------------------------


def test_bad_gpu_targets_are_one_line(small, tmp_path, monkeypatch):
    with pytest.raises(jaxft.JaxftError, match=r"^--topology: 'h101' is neither a TPU slice "
                       r"jaxft knows .* nor a GPU \(known: h100, h100-pcie, h200, "):
        plan.print_plan(gpu_config(small, tmp_path), "h101")
    broken = tmp_path / "broken.txtpb"
    text = (gpu.SPECS / "l4.txtpb").read_text()
    broken.write_text(text.replace("core_count: 58", "core_count: many"))
    with pytest.raises(jaxft.JaxftError, match=rf"^{re.escape(str(broken))}: not a "
                       r"GpuTargetConfigProto XLA:GPU reads \(line \d+, field core_count: "):
        gpu.topology(str(broken))
    missing = tmp_path / "missing.txtpb"
    missing.write_text(re.sub(r"\s*threads_per_warp: \d+", "", text))
    with pytest.raises(jaxft.JaxftError, match=rf"^{re.escape(str(missing))}: field "
                       r"threads_per_warp is missing"):
        gpu.topology(str(missing))
    newer = tmp_path / "newer.txtpb"
    newer.write_text(text.replace("  threads_per_warp: 32",
                                  "  threads_per_warp: 32\n  collective_memory_granularity: 4"))
    assert gpu.topology(str(newer)).memory_bytes == gpu.topology("l4").memory_bytes
    with pytest.raises(jaxft.JaxftError, match=r"^config: train.batch_size 4 is not divisible "
                       r"by the data-parallel size 8 "):
        plan.make_plan(gpu_config(small, tmp_path), gpu.topology("h100x8"))
    with pytest.raises(jaxft.JaxftError, match=r"^--topology h100x12: more than 8 GPUs come as "
                       r"hosts of 8; ask for a multiple of 8$"):
        gpu.topology("h100x12")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "jax_plugins.xla_cuda12" else real(name, *a))
    with pytest.raises(jaxft.JaxftError, match=r"^--topology h100 compiles with XLA's GPU "
                       r"compiler, which comes with JAX's CUDA plugin; install it with: pip "
                       r"install "):
        gpu.topology("h100")


def test_readme_gpu_tables_are_the_tools_output_of_its_json():
    """The README's "will it fit on a GPU" tables are `tools/gpu_fit.py`'s rendering of
    benchmarks/gpu_fit.json, so neither can drift from the other."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_fit

    rows = json.loads((ROOT / "benchmarks" / "gpu_fit.json").read_text())
    assert {(r["model"], r["mode"], r["gpu"]) for r in rows["fit"]} == {
        (label, mode, name) for label in ("Llama-3.2-1B", "Llama-3.1-8B")
        for mode in gpu_fit.MODES for name in gpu_fit.GPUS}
    readme = (ROOT / "README.md").read_text()
    for begin, end, table in ((gpu_fit.FIT_BEGIN, gpu_fit.FIT_END,
                               gpu_fit.fit_markdown(rows["fit"])),
                              (gpu_fit.LAPTOP_BEGIN, gpu_fit.LAPTOP_END,
                               gpu_fit.laptop_markdown(rows["laptop"]))):
        assert readme.split(begin + "\n")[1].split("\n" + end)[0] == table
