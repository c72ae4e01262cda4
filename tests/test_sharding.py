"""Sharded training equals single-device training, and parameters really are sharded."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxft
from jaxft import sharding, train
from tests.tiny_run import (
    REPO,
    subprocess_env,
    tiny_config,
    tiny_model_dir,
    train_losses,
    write_config_file,
)

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

STEPS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 heads, 2 kv heads, hidden 64: every sharded dimension divides 2 and 4.
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", num_key_value_heads=2)


def single_device_losses(model_dir, tmp_path, **overrides) -> dict[int, float]:
    workdir = tmp_path / "one-device"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **overrides)
    subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={config}"], check=True,
                   cwd=REPO, env=subprocess_env(1), capture_output=True)
    return train_losses(workdir)


MESHES = {  # pure data parallel; fsdp over four with data over two; all three axes at once
    "lora": [(8, 1, 1), (2, 4, 1), (2, 2, 2)], "full": [(8, 1, 1), (2, 4, 1), (2, 2, 2)],
    "qlora": [(2, 2, 2)]}


@pytest.mark.parametrize("mode", ["lora", "full", "qlora"])
def test_meshes_give_single_device_losses(mode, model_dir, tmp_path):
    overrides = {"train.steps": STEPS, "lora.enabled": mode != "full",
                 "optim.lr": 1e-3 if mode == "full" else 3e-3, "data.eval_fraction": 0.0}
    if mode == "qlora":  # packed codes and scales sharded along the kernels' own axes
        overrides.update({"lora.base_quant": "nf4", "lora.double_quant": True})
    expected = single_device_losses(model_dir, tmp_path, **overrides)
    assert len(expected) == STEPS
    for mesh in MESHES[mode]:
        workdir = tmp_path / f"mesh-{'x'.join(map(str, mesh))}"
        cfg = tiny_config(model_dir, workdir, **overrides, **{
            "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
        train.run(cfg)
        got = train_losses(workdir)
        np.testing.assert_allclose([got[s] for s in sorted(got)],
                                   [expected[s] for s in sorted(expected)], rtol=1e-4,
                                   err_msg=f"mesh {mesh}")


def test_parameters_are_sharded_on_the_mesh(model_dir):
    mesh = sharding.make_mesh(2, 2, 2)
    model = jaxft.from_pretrained(model_dir, mesh=mesh)
    q = model.model.layers.self_attn.q_proj.kernel[...]  # [layers, embed, heads]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    embed = model.model.embed_tokens.embedding[...]  # [vocab, embed]
    assert embed.sharding.spec[1] == "fsdp"


def test_packed_nf4_kernels_are_sharded_like_the_kernels(model_dir):
    mesh = sharding.make_mesh(2, 2, 2)
    model = jaxft.from_pretrained(model_dir, mesh=mesh, quantize="nf4")
    kernel = model.model.layers.self_attn.q_proj.kernel  # [layers, embed 64, heads 64]
    codes = kernel.codes[...]  # [layers, 32, 64]: two 4-bit codes to a byte along embed
    assert codes.sharding.spec == P(None, "fsdp", "tensor")
    assert codes.addressable_shards[0].data.shape == (codes.shape[0], 16, 32)
    # one absmax per 64 inputs: a single row, which fsdp cannot divide, so only tensor splits it
    assert kernel.absmax[...].sharding.spec == P(None, None, "tensor")


def test_dimension_the_mesh_cannot_divide_stays_replicated():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.spec_for(("vocab", "embed"), (601, 64), mesh) == P(None, "fsdp")
    assert sharding.spec_for(("layers", "embed", "mlp"), (2, 64, 96), mesh) == \
        P(None, "fsdp", "tensor")


def test_experts_split_over_the_expert_axis():
    """Each device of the expert axis holds E/n whole experts (of every layer); a count the
    axis cannot divide is refused, since experts are what that axis is for."""
    mesh = sharding.make_mesh(1, 2, 2, expert=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert sharding.spec_for(("layers", "experts", "embed", "mlp"), (3, 6, 64, 64), mesh) == \
        P(None, "expert", "fsdp", "tensor")
    assert sharding.data_parallel_size(mesh) == 4  # rows split over fsdp × expert
    with pytest.raises(jaxft.JaxftError, match="^mesh: mesh.expert=2 does not divide the 5 "
                                               "experts$"):
        sharding.spec_for(("layers", "experts", "embed", "mlp"), (3, 5, 64, 64), mesh)


def test_optimizer_state_is_sharded_like_its_parameters(model_dir):
    from flax import nnx

    from jaxft import config, lora, optim

    mesh = sharding.make_mesh(2, 4, 1)
    model = jaxft.from_pretrained(model_dir, mesh=mesh)
    cfg = lora.LoraConfig(rank=4, targets="all-linear")
    lora.apply_lora(model, cfg)
    trainable = nnx.state(model, nnx.Param)  # full fine-tuning: base and adapters
    targets = sharding.state_shardings(trainable, mesh)
    tx, _ = optim.make_optimizer(config.base_config().optim, trainable, 10)
    opt_shardings = sharding.optimizer_shardings(tx, trainable, targets, mesh)
    flat = jax.tree_util.tree_flatten_with_path(opt_shardings)[0]
    moments = {jax.tree_util.keystr(p): s for p, s in flat if "q_proj']['kernel" in
               jax.tree_util.keystr(p)}
    assert len(moments) == 2  # AdamW's mu and nu
    assert all(s.spec == P(None, "fsdp", "tensor") for s in moments.values())
    counters = [s for p, s in flat if "count" in jax.tree_util.keystr(p)]
    assert counters and all(s.spec == P() for s in counters)
