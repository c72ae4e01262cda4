"""The GPU's grouped matmul (tiles in a scan) computes what `jax.lax.ragged_dot` computes, and
its gradients, for empty groups, rows of no group and weights kept packed; compiled for an
H100 it holds a fraction of what XLA:GPU's own lowering of ragged_dot holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import quant
from jaxft.kernels import grouped_matmul as gm

SIZES = [[5, 0, 17, 3], [0, 0, 40, 0], [10, 10, 10, 10], [3, 4, 0, 1]]  # of 40 rows


@pytest.mark.parametrize("sizes", SIZES)
def test_tiles_compute_ragged_dot_and_its_gradients(sizes):
    rng = np.random.RandomState(0)
    rows = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(4, 24, 12)), jnp.float32)
    groups = jnp.asarray(sizes, jnp.int32)
    used = sum(sizes)  # rows past it belong to no group: unspecified in both

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, groups)[:used]))

    tiles = lambda x, w, s: gm.tiled_grouped_matmul(x, w, s, tile=8)  # noqa: E731
    np.testing.assert_allclose(tiles(rows, weights, groups)[:used],
                               jax.lax.ragged_dot(rows, weights, groups)[:used], atol=1e-5)
    want = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(rows, weights)
    got = jax.grad(loss(tiles), argnums=(0, 1))(rows, weights)
    for name, a, b in zip(["rows", "weights"], got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def test_packed_weights_are_dequantized_one_tile_at_a_time():
    """MXFP4 experts through the tiles equal their dequantized weights through ragged_dot."""
    rng = np.random.RandomState(1)
    dense = rng.normal(size=(3, 64, 16)).astype(np.float32)
    cfg = quant.QuantConfig(quant.MXFP4)
    module = quant.MXFP4Weight(dense.shape, (None, None, None), jnp.float32, cfg)
    for name in ("codes", "scales"):
        getattr(module, name)[...] = jnp.asarray(np.stack(
            [quant.MXFP4Weight.encode(w, cfg)[name] for w in dense]))
    from flax import nnx

    graph, arrays = nnx.split(module)
    packed = gm.Packed(arrays, lambda a: nnx.merge(graph, a).dequantize(jnp.float32))
    rows = jnp.asarray(rng.normal(size=(20, 64)), jnp.float32)
    sizes = jnp.asarray([7, 0, 13], jnp.int32)
    want = jax.lax.ragged_dot(rows, module.dequantize(jnp.float32), sizes)
    np.testing.assert_allclose(gm.tiled_grouped_matmul(rows, packed, sizes, tile=8), want,
                               atol=1e-5)


def test_tiles_hold_a_fraction_of_xla_gpus_ragged_dot_on_an_h100():
    """gpt-oss-20b's gate_up projection for 2,048 tokens × 4 experts, forward and backward:
    XLA:GPU's ragged_dot masks a copy of the rows for each of the 32 experts."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxft.plan import gpu

    topology = gpu.topology("h100")
    one = NamedSharding(Mesh(np.asarray(topology.devices[:1]), ("x",)), PartitionSpec())
    rows = jax.ShapeDtypeStruct((8192, 2880), jnp.bfloat16, sharding=one)
    weights = jax.ShapeDtypeStruct((32, 2880, 5760), jnp.bfloat16, sharding=one)
    sizes = jax.ShapeDtypeStruct((32,), jnp.int32, sharding=one)

    def temporaries(fn) -> int:
        step = jax.grad(lambda x, w, s: jnp.sum(fn(x, w, s).astype(jnp.float32)))
        compiled, _ = topology.compile(jax.jit(step).lower(rows, weights, sizes))
        return compiled.memory_analysis().temp_size_in_bytes

    ragged, tiled = temporaries(jax.lax.ragged_dot), temporaries(gm.tiled_grouped_matmul)
    assert ragged > 3 * 2**30  # 32 masked copies of the rows, and their gradient
    assert tiled < ragged / 8, (tiled, ragged)
