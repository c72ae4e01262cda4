"""TPU without a TPU: XLA's TPU compiler (libtpu) compiles jaxft's programs for TPU slices on
this CPU machine, and its own memory analysis and out-of-memory refusal are what the dry run and
`--suggest` report.

Every program here is compiled for compile-only TPU devices and never run. The models are small
Llamas (config.json only) whose head dim (64) and length (256) splash attention takes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxft
from jaxft import generate, plan, spec, train_step
from jaxft.hf.model import ModelOptions, model_config
from jaxft.kernels import attention as attention_kernel
from jaxft.kernels import cross_entropy, swiglu
from jaxft.models import attention
from jaxft.plan import dry_run, suggest, tpu
from tests.tiny_run import subprocess_env, tiny_config, write_config_file

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="needs libtpu: pip install -e '.[tpu]'"),
              pytest.mark.slow]  # (see the README: the -m 'not slow' lane)

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
GIB = 1024**3


def config_dir(path: Path, **overrides) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**SMALL_LLAMA, **overrides}))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return config_dir(tmp_path_factory.mktemp("small-llama"))


def tpu_config(model_dir: Path, tmp_path: Path, **overrides):
    return tiny_config(model_dir, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": -1, "data.max_len": 256, "train.batch_size": 8,
        "train.param_dtype": "bfloat16", "train.compute_dtype": "auto",
        "data.train_path": str(tmp_path / "no-data-needed.jsonl"), **overrides})


def lower_train_step(cfg, mesh: Mesh):
    """The training step `cfg` describes, assembled by `train_step.build` for `mesh` and lowered
    on abstract arrays (bfloat16 base, a batch of 8 × 256): what the planner compiles."""
    run = spec.resolve(cfg, mesh.devices.flat)
    model = dry_run.configured_model(run)[1]
    step, states = train_step.build(model, run, mesh)
    placed = step.place(states)
    batch = dry_run.abstract_batch(run, mesh)
    window, number = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step.replicated),
        (train_step.zero_window("lm"), train_step.step_number(0)))
    return step.train.lower(placed["trainable"], placed["frozen"], placed["dropout"],
                            placed["opt_state"], window, batch, number)


# ---------------------------------------------------------------------------------------------
# Slices by name
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, devices, kind", [
    ("v5e-8", 8, "TPU v5 lite"), ("v5e-1", 1, "TPU v5 lite"), ("v5e:2x2", 4, "TPU v5 lite"),
    ("v4-8", 4, "TPU v4"), ("v5p-8", 4, "TPU v5"), ("v6e-8", 8, "TPU v6 lite"),
    ("v5e-16", 16, "TPU v5 lite")])
def test_slices_by_their_cloud_names(name, devices, kind):
    """v4-8 and v5p-8 count TensorCores (4 chips, one megacore device each); v5e-8 and v6e-8
    count chips."""
    topology = tpu.topology(name)
    assert topology.num_devices == devices
    assert {d.device_kind for d in topology.devices} == {kind}


def test_usable_hbm_is_the_compilers_own_figure():
    assert tpu.usable_hbm(tpu.topology("v5e-8")) == int(15.75 * GIB)  # of v5e's 16 GiB
    assert tpu.usable_hbm(tpu.topology("v6e-8")) == int(31.25 * GIB)


@pytest.mark.parametrize("name", ["v5e-7", "v9-8", "tpu", "v4-3", "v5e:3"])
def test_unknown_slice_lists_the_known_ones(name):
    with pytest.raises(jaxft.JaxftError, match=r"not a TPU slice jaxft knows; known: v4-8, "
                       r"v4-16, .*v5e-8.*'v5e:2x4'") as e:
        tpu.topology(name)
    assert "\n" not in str(e.value)


def test_missing_libtpu_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(jaxft.JaxftError, match=r'install it with: pip install '
                       r'"jax\[tpu\]==' + re.escape(jax.__version__) + '"$'):
        tpu.topology("v5e-8")


# ---------------------------------------------------------------------------------------------
# The dry run for a slice
# ---------------------------------------------------------------------------------------------


def test_dry_run_for_v5e_is_xla_tpus_own_memory_analysis(small, tmp_path, capsys):
    """The printed peak is what XLA:TPU's memory_analysis() says for the step compiled apart
    from the planner, and every hardware choice is the TPU's: bfloat16 compute, splash
    attention, the accelerator's cross-entropy chunk."""
    topology = tpu.topology("v5e-8")
    cfg = tpu_config(small, tmp_path)
    p = plan.print_plan(cfg, "v5e-8")  # what `--dry_run --topology=v5e-8` runs
    assert (p.platform, p.compute_dtype, p.mesh) == ("tpu", "bfloat16",
                                                     {"data": 1, "fsdp": 8, "expert": 1,
                                                      "tensor": 1})

    # The same step, assembled and compiled here for the same mesh.
    from jaxft.sharding import make_mesh

    lowered = lower_train_step(cfg, make_mesh(1, 8, 1, devices=list(topology.devices)))
    m = lowered.compile().memory_analysis()
    xla_peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    print(f"planner {p.peak_bytes} B, XLA:TPU {xla_peak} B")
    assert abs(p.peak_bytes - xla_peak) <= 0.05 * xla_peak
    assert "splash_mha" in lowered.as_text()  # auto attention on a TPU target is splash

    text = capsys.readouterr().out
    assert "target: v5e-8 (8 × TPU v5e, 2x4), compiled by XLA:TPU" in text
    assert "mesh data 1 × fsdp 8 × tensor 1 (8 chips)" in text
    assert f"peak ≈ {plan.human_bytes(p.peak_bytes)} of 15.75 GiB usable HBM per chip: fits" \
        in text
    assert "197 TFLOP/s per chip" in text and "XLA:CPU" not in text
    expected_seconds = (p.analytic_flops + p.recompute_flops) / (8 * 197e12)
    assert p.step_seconds == pytest.approx(expected_seconds)
    assert p.tokens_per_second == pytest.approx(8 * 256 / expected_seconds)


SMALL_GEMMA2 = {
    "model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 1024, "sliding_window": 128,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "max_position_embeddings": 2048,
}


def test_gemma2_step_compiles_for_tpu_with_both_splash_kernels(tmp_path):
    """Gemma 2 on v5e-8: each scanned layer chooses by its flag between splash's local (a
    128-token window) and causal kernels, both soft-capped at Gemma's head dim of 256, inside
    the per-device shard_map; XLA:TPU compiles the whole training step."""
    model_dir = tmp_path / "gemma2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMALL_GEMMA2))
    cfg = tpu_config(model_dir, tmp_path, **{"lora.targets": "all-linear"})
    topology = tpu.topology("v5e-8")
    from jaxft.sharding import make_mesh

    lowered = lower_train_step(cfg, make_mesh(1, 8, 1, devices=list(topology.devices)))
    text = lowered.as_text()
    assert "splash_mha" in text and "stablehlo.case" in text
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


def test_remat_recomputation_is_counted(small, tmp_path):
    """Full remat reruns every layer's forward: 2N per token for the layers' projections,
    plus attention; the output head is outside the layers and is not rerun."""
    cfg = tpu_config(small, tmp_path, **{"lora.enabled": False})
    flops = {remat: sum(step) for remat, step in
             suggest.flops_by_remat(cfg, tpu.topology("v5e-8")).items()}
    d, f, layers_, t = 256, 512, 2, 256
    projections = layers_ * (d * d + 2 * d * 128 + d * d + 3 * d * f)  # q, k+v (2 kv heads), o, mlp
    attention_fwd = 4 * t * d * layers_
    tokens = 8 * t
    assert flops["dots_saveable"] - flops["none"] == tokens * attention_fwd
    assert flops["full"] - flops["none"] == tokens * (2 * projections + attention_fwd)


def test_out_of_memory_is_a_result_with_xlas_figure(tmp_path):
    """Full fine-tuning with no remat of 64 × 4096 tokens on one v5e chip: XLA:TPU refuses to
    compile, and the plan says so with the compiler's figure instead of a traceback."""
    big = config_dir(tmp_path / "big", hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=1,
                     vocab_size=32000)
    cfg = tpu_config(big, tmp_path, **{"lora.enabled": False, "train.batch_size": 64,
                                       "data.max_len": 4096, "train.param_dtype": "float32"})
    p = plan.make_plan(cfg, tpu.topology("v5e-1"))
    assert p.fits is False
    found = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM "
                      r"\(15.75G\)", p.refusal)
    assert found, p.refusal
    temporaries = float(found.group(1)) * GIB
    assert p.peak_bytes == int(temporaries) + p.argument_bytes > 15.75 * GIB
    text = plan.describe(p)
    assert re.search(r"XLA:TPU memory per chip: does not fit \(needs ≥ [\d.]+ GiB of 15.75 GiB: "
                     rf"{found.group(1)} GiB of temporaries, by XLA:TPU, \+ [\d.]+ \w+ of "
                     r"arguments\)", text), text
    assert "refused to compile the step: RESOURCE_EXHAUSTED: Ran out of memory" in text


@pytest.mark.parametrize("message, needed, whole", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (51.83G) exceeds available HBM (15.75G).", 51.83 * GIB, False),
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
     "memory in memory space hbm. Used 15.76G of 15.75G hbm. Exceeded hbm capacity by 17.38M.",
     15.76 * GIB, True),
])
def test_both_ways_xla_tpu_words_an_out_of_memory(message, needed, whole):
    """Recorded from XLA:TPU (libtpu 0.0.42): temporaries alone (Llama-3-8B LoRA, remat none,
    XLA attention, v5e-8) or the whole program (with splash and fsdp 4 × tensor 2)."""
    assert tpu.out_of_memory(RuntimeError(message)) == message
    assert tpu.required_bytes(message) == (int(needed), whole)


def test_dry_run_command_refusals_are_one_line(small, tmp_path):
    """A bad slice and --topology without --dry_run on the command line, --suggest without
    --topology and a batch the slice cannot split: one line each, before anything compiles
    (the good path is `print_plan`, above)."""
    config_file = write_config_file(tmp_path / "cfg.py", small, tmp_path / "run", **{
        "mesh.data": 1, "mesh.fsdp": -1, "data.max_len": 256, "train.batch_size": 8,
        "train.compute_dtype": "auto", "data.train_path": str(tmp_path / "none.jsonl")})
    for flags, message in [
        (("--dry_run", "--topology=v5e-7"), "error: --topology: 'v5e-7' is not a TPU slice"),
        (("--topology=v5e-8",), "error: --topology and --suggest plan a run; add --dry_run"),
    ]:
        bad = subprocess.run(
            [sys.executable, "-m", "jaxft.train", f"--config={config_file}", *flags],
            capture_output=True, text=True, env=subprocess_env(1), timeout=300)
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
    assert not (tmp_path / "run").exists()
    cfg = tpu_config(small, tmp_path)
    with pytest.raises(jaxft.JaxftError, match=r"^--suggest compiles for a TPU slice or GPUs; "
                       r"add --topology \(e.g. v5e-8 or h100x8\)$"):
        suggest.print_suggestions(cfg, None)
    with pytest.raises(jaxft.JaxftError, match=r"^config: train.batch_size 8 is not divisible "
                       r"by the data-parallel size 16 "):
        plan.make_plan(cfg, tpu.topology("v5e-16"))  # a slice the batch cannot split
    with pytest.raises(jaxft.JaxftError, match=r"^--suggest: train.batch_size 8 cannot be split "
                       r"over 6 chips in any layout; use a multiple of 3$"):
        suggest.search(cfg, tpu.topology("v5e:2x3"))  # fsdp 3 × tensor 2 is the smallest


def test_suggest_compiles_within_its_budget_and_suggests_a_fit(tmp_path):
    """Full fine-tuning of a model whose float32 embedding, head and AdamW moments (about
    24 GiB) fit a v5e-8 only when sharded: `data` (replicated) does not fit even at its most
    frugal setting, so the search leaves it after two compiles; with a budget of three the
    tensor layouts are left uncompiled; the suggestion is fsdp, as a training command."""
    wide = config_dir(tmp_path / "wide", hidden_size=1024, intermediate_size=1024,
                      num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=1,
                      vocab_size=524288)
    cfg = tpu_config(wide, tmp_path, **{"lora.enabled": False, "data.max_len": 128,
                                        "train.param_dtype": "float32"})
    topology = tpu.topology("v5e-8")
    lines = []
    trials = suggest.search(cfg, topology, max_compiles=3, progress=lines.append)
    compiled = {(t.candidate.layout, t.candidate.remat): t for t in trials if t.plan is not None}
    assert set(compiled) == {("fsdp", "none"), ("data", "none"), ("data", "full")}
    assert [compiled[k].fits for k in sorted(compiled)] == [False, False, True]
    assert sum("compiling" in line for line in lines) == 3
    best = trials[0]
    assert (best.candidate.layout, best.candidate.remat, best.fits) == ("fsdp", "none", True)
    assert {t.skipped for t in trials if t.candidate.layout.startswith("fsdp+tensor")} == {
        "over the 3-compile budget"}

    text = suggest.describe(trials, topology, ["train.py", "--config=c.py", "--dry_run",
                                               "--topology=v5e-8", "--suggest"])
    assert re.search(r"  data\s+full\s+1\s+[\d.]+ GiB\s+no", text)
    assert text.splitlines()[-1].strip() == (
        "python -m jaxft.train --config=c.py --config.mesh.data=1 --config.mesh.fsdp=8 "
        "--config.mesh.tensor=1 --config.train.remat=none --config.train.accum_steps=1")


# ---------------------------------------------------------------------------------------------
# Every kernel compiles for TPU
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chip():
    """One v5e chip as a mesh, and a function placing abstract arrays on it."""
    mesh = Mesh(np.asarray(tpu.topology("v5e-1").devices), ("one",))
    on_chip = NamedSharding(mesh, PartitionSpec())

    def shaped(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    return shaped


def test_fused_kernels_compile_for_tpu(chip):
    """The head + cross-entropy, the attention backward and the SwiGLU backward, with their
    gradients, each compiled by XLA:TPU."""
    b, t, d, v, h = 2, 256, 128, 1000, 64

    def ce(hidden, w):
        weights = jnp.ones((b, t), jnp.float32)
        return cross_entropy.head_cross_entropy(hidden, w, jnp.zeros((b, t), jnp.int32), weights)

    def attn(q, k, v_):
        mask = attention.attention_mask(*(jnp.ones((b, t), jnp.int32),) * 2,
                                     *(jnp.broadcast_to(jnp.arange(t), (b, t)),) * 2, causal=True)
        out = attention_kernel.attention(q, k, v_, mask[:, :, None], None, h**-0.5)
        return out.astype(jnp.float32).sum()

    def mlp(gate, up):
        return swiglu.swiglu(gate, up).astype(jnp.float32).sum()

    programs = [
        (ce, (chip((b, t, d)), chip((d, v)))),
        (attn, (chip((b, 2, 2, t, h)), chip((b, 2, t, h)), chip((b, 2, t, h)))),
        (mlp, (chip((b, t, 512)), chip((b, t, 512)))),
    ]
    for fn, args in programs:
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        assert compiled.memory_analysis().temp_size_in_bytes >= 0, fn.__name__


def test_generation_compiles_for_tpu(small, chip):
    """Generation's one program (prefill, then the decode loop over the KV cache)."""
    family, cfg = model_config(json.loads((small / "config.json").read_text()), str(small),
                               ModelOptions(compute_dtype="bfloat16"))
    model = nnx.eval_shape(lambda: family.Model(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: chip(x.shape, x.dtype), state)
    b, t = 2, 16
    lowered = generate._generate.lower(
        graphdef, state, chip((b, t), jnp.int32), chip((b, t), jnp.int32),
        chip((1,), jnp.int32), chip((), jnp.int32), chip((2,), jnp.uint32),
        chip((), jnp.float32), chip((), jnp.int32), chip((), jnp.float32),
        max_new_tokens=8, cache_length=t + 8, greedy=True)
    assert lowered.compile().memory_analysis() is not None


def test_readme_qlora_rows_are_xla_tpus_own_figures(tmp_path):
    """The README's QLoRA table (Llama-2-7B, LoRA rank 16 on all seven projections, 1 × 2048
    tokens, remat full, bf16): the NF4 row's base bytes and XLA:TPU peak on v5e-1 are this
    compile's, and the bf16 row's base bytes are the abstract model's."""
    from tests.test_quant import LLAMA_2_7B

    model_dir = config_dir(tmp_path / "llama-2-7b", **LLAMA_2_7B)
    settings = {"lora.rank": 16, "lora.alpha": 32.0, "train.batch_size": 1, "data.max_len": 2048,
                "train.remat": "full", "train.compute_dtype": "bfloat16", "mesh.fsdp": 1}
    cfg = tpu_config(model_dir, tmp_path, **settings, **{"lora.base_quant": "nf4",
                                                         "lora.double_quant": True})
    nf4 = plan.make_plan(cfg, tpu.topology("v5e-1"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert (f"| NF4 + double quantization | {plan.human_bytes(nf4.frozen.per_device)} | "
            f"{plan.human_bytes(nf4.peak_bytes)} |") in readme
    _, bf16 = dry_run.configured_model(spec.resolve(tpu_config(model_dir, tmp_path, **settings),
                                                    tpu.topology("v5e-1").devices))
    frozen = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))
                 if x.dtype == jnp.bfloat16)
    assert f"| bfloat16 (`base_quant=none`) | {plan.human_bytes(frozen)} |" in readme
