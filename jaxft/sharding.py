"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel with
parameters and optimizer state sharded), `expert` (a mixture of experts' experts split between
devices, each holding E/n of them; for every other weight it is one more data-parallel axis),
`tensor` (model parallel inside each layer). Batches are split over `data`×`fsdp`×`expert`. A
dimension whose size the mesh axis does not divide stays replicated, so odd vocabularies or head
counts still run, just less sharded; experts the `expert` axis cannot divide are refused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.errors import JaxftError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (None: replicated)
RULES: dict[str | None, str | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "embed_out": None,
    "layers": None,
    "norm": None,
    None: None,
}


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int,
               expert: int = 1) -> tuple[int, ...]:
    """The sizes of `MESH_AXES` (data, fsdp, expert, tensor), a `-1` resolved to "the rest of
    the devices" and the product checked. `mesh.data=-1` (the default) is what the other axes
    leave: 1 when fsdp, expert or tensor takes every device itself."""
    sizes = [data, fsdp, expert, tensor]
    if data == -1 and -1 in (fsdp, expert, tensor):
        sizes[0] = 1
    if sizes.count(-1) > 1:
        raise JaxftError(f"mesh: at most one of mesh.fsdp/expert/tensor may be -1, got "
                         f"{sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise JaxftError(f"mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise JaxftError(f"mesh: {known} (product of the fixed sizes {sizes}) does not divide "
                             f"the {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise JaxftError(f"mesh: data×fsdp×expert×tensor = {math.prod(sizes)} but there are "
                         f"{device_count} devices (use -1 for one axis to take the rest)")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: list | None = None, expert: int = 1) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, tensor, len(devices), expert)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(axes: tuple | None, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axes, replicating what cannot divide."""
    if not axes:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = RULES.get(name)
        targets = tuple(t for t in ((target,) if isinstance(target, str) else target or ())
                        if t in mesh.axis_names)
        ways = math.prod(mesh.shape[t] for t in targets)
        if name == "experts" and size % ways:
            raise JaxftError(f"mesh: mesh.expert={ways} does not divide the {size} experts")
        if not targets or any(t in used for t in targets) or size % ways:
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where one variable lives, from its `axes` metadata."""
    shape = var.get_value().shape
    return NamedSharding(mesh, spec_for(var.get_metadata().get("axes"), shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every variable of a state (a prefix tree for `jax.jit`)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def put(array, target: NamedSharding) -> jax.Array:
    """Place a host (or single-device) array on a sharding, on one host or many.

    Each process supplies only the shards its own devices hold, so this also works when the
    sharding spans devices of other processes.
    """
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def put_state(state: nnx.State, shardings: nnx.State) -> nnx.State:
    """`put` for every array of a state."""
    return jax.tree.map(lambda target, x: put(x, target), shardings, state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over data×fsdp×expert, every other dimension whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: data×fsdp×expert."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def data_parallel_size_of(shape: tuple[int, ...]) -> int:
    """data×fsdp×expert of a mesh shape (sizes of `MESH_AXES`)."""
    return math.prod(shape[MESH_AXES.index(a)] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device: scalars, RNG keys, metrics."""
    return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(tx, trainable: nnx.State, param_shardings: nnx.State,
                        mesh: Mesh) -> object:
    """Shardings of `tx.init(trainable)`: every moment exactly as its parameter (so fsdp shards
    optimizer state too), step counters and other scalars replicated.

    A moment is recognised by its key path, which ends with its parameter's path, and its shape.
    """
    full = jax.tree.map(lambda target, x: target, param_shardings, trainable)  # one per array
    params = [(jax.tree_util.keystr(path), x.shape, target) for (path, x), target in zip(
        jax.tree_util.tree_flatten_with_path(trainable)[0], jax.tree.leaves(full), strict=True)]

    def pick(path, leaf) -> NamedSharding:
        key = jax.tree_util.keystr(path)
        for param_key, shape, target in params:
            if key.endswith(param_key) and leaf.shape == shape:
                return target
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, trainable))


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """`fn`, traced with `mesh` as the ambient (abstract) mesh, for what reads it while tracing:
    `jaxft.target.platform` (kernels and chunk sizes chosen for the mesh's devices, which for
    the dry run are a TPU slice's, not this host's) and the splash kernel's `shard_map`."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced
