"""What each grouped matmul costs, by the compilers' own analyses, on hardware this host lacks.

One expert projection of gpt-oss-20b (2,048 tokens × 4 experts = 8,192 rows of 2,880, 32
experts of 2,880 × 5,760, bfloat16), forward, and forward plus the backward to the rows (what
LoRA training needs), compiled for one v5e chip (XLA:TPU: `jax.lax.ragged_dot` and Pallas'
megablox `gmm`) and one H100 (XLA:GPU: `ragged_dot` and jaxft's tiles). Prints FLOPs, bytes
accessed (0 where the compiler reports none) and temporaries for each; the README's "Mixtures
of experts" quotes them.

    JAX_PLATFORMS=cpu python tools/moe_matmul_costs.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.kernels.grouped_matmul import tiled_grouped_matmul
from jaxft.plan import gpu, tpu

ROWS, D, F, EXPERTS = 8192, 2880, 5760, 32


def gmm(rows, weights, sizes):
    return megablox.gmm(rows, weights, sizes, jnp.bfloat16, (512, 1024, 1024))


def costs(target, fn) -> list[str]:
    one = NamedSharding(Mesh(np.asarray(target.devices[:1]), ("x",)), PartitionSpec())
    shapes = (jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16, sharding=one),
              jax.ShapeDtypeStruct((EXPERTS, D, F), jnp.bfloat16, sharding=one),
              jax.ShapeDtypeStruct((EXPERTS,), jnp.int32, sharding=one))
    lines = []
    backward = jax.grad(lambda x, w, s: jnp.sum(jnp.sin(fn(x, w, s).astype(jnp.float32))))
    for what, f in (("forward", fn), ("forward + backward", backward)):
        compiled, _ = target.compile(jax.jit(f).lower(*shapes))
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}  # XLA:GPU may give none
        temp = compiled.memory_analysis().temp_size_in_bytes
        flops, read = cost.get("flops", 0), cost.get("bytes accessed", 0)
        lines.append(f"{what:<20}{flops:>12.3e}{read:>12.3e}{temp / 2**20:>12.1f}")
    return lines


def main() -> None:
    print(f"{'':<20}{'FLOPs':>12}{'bytes':>12}{'temp MiB':>12}")
    for label, target, fn in (("v5e, ragged_dot", tpu.topology("v5e-1"), jax.lax.ragged_dot),
                              ("v5e, megablox gmm", tpu.topology("v5e-1"), gmm),
                              ("h100, ragged_dot", gpu.topology("h100"), jax.lax.ragged_dot),
                              ("h100, tiles", gpu.topology("h100"), tiled_grouped_matmul)):
        print(label)
        for line in costs(target, fn):
            print("  " + line)


if __name__ == "__main__":
    main()
