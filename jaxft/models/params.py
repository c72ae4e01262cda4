"""One table per model family, read both ways: Hugging Face tensors in, Hugging Face tensors out.

A family declares `TensorMapping(((hf_name, jaxft_path, transform), ...))`. `{L}` in a Hugging
Face name is the layer index, which selects a slice of the stacked layer arrays in the jaxft path;
`{E}` is an expert's index, the next axis, and a `Part` says which piece of the last axis the
tensor is (Mixtral's `w1` and `w3` are the two halves of jaxft's fused `gate_up_proj`). Aliases
are other names for the same parameters that load but are never written (transformers 5's fused
expert tensors). A model that keeps its layers in more than one stack (a mixture of experts with
dense layers among the sparse ones) places each layer with a `LayerPlacement`
(`TensorMapping.placed`): the table is written for one stack and the placement moves layer i's
tensors to its own stack and index there. Transforms come from a closed, invertible set, so
export never needs a hand-written inverse.
Loading streams tensors one at a time into preallocated buffers, collects every problem, and
raises once with all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import collected

IDENTITY = "identity"
TRANSPOSE = "transpose"
SWAP_LAST = "swap_last"  # the last two axes: [E, out, in] <-> [E, in, out]
# transform -> (Hugging Face -> jaxft, jaxft -> Hugging Face)
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    IDENTITY: (lambda a: a, lambda a: a),
    TRANSPOSE: (lambda a: a.T, lambda a: a.T),
    SWAP_LAST: (lambda a: np.swapaxes(a, -1, -2), lambda a: np.swapaxes(a, -1, -2)),
}


@dataclasses.dataclass(frozen=True)
class Part:
    """A Hugging Face tensor that is piece `index` of `of` equal pieces of its jaxft parameter's
    last axis (in jaxft's layout)."""

    index: int
    of: int


WHOLE = Part(0, 1)


@dataclasses.dataclass(frozen=True)
class Hit:
    """Where one Hugging Face tensor goes: its parameter path, layer (None: not stacked),
    expert (None: all of them, or none), piece of the last axis, and transform."""

    path: str
    layer: int | None
    expert: int | None
    part: Part
    transform: str

    def shape_in(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """This tensor's shape (jaxft layout) inside a parameter of shape `full`."""
        shape = full[(self.layer is not None) + (self.expert is not None):]
        return (*shape[:-1], shape[-1] // self.part.of) if self.part.of > 1 else shape

    def target(self, full: tuple[int, ...]) -> tuple:
        """The index of this tensor's slice in a parameter of shape `full`."""
        lead = tuple(i for i in (self.layer, self.expert) if i is not None)
        if self.part.of == 1:
            return lead
        width = full[-1] // self.part.of
        return (*lead, Ellipsis, slice(self.part.index * width, (self.part.index + 1) * width))


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
    """Which stack each Hugging Face layer lives in, for a model with more than one.

    The table names every layer's parameters under `home` (`model.layers.`); `stacks[i]` is the
    jaxft prefix of the stack that holds layer i, at the index counting the earlier layers that
    stack holds.
    """

    home: str
    stacks: tuple[str, ...]

    def place(self, layer: int) -> tuple[str, int]:
        """(stack prefix, index in it) of Hugging Face layer `layer`."""
        prefix = self.stacks[layer]
        return prefix, self.stacks[:layer].count(prefix)

    def layers_of(self, prefix: str) -> list[int]:
        """The Hugging Face layers a stack holds, in order."""
        return [i for i, p in enumerate(self.stacks) if p == prefix]

    def stack_of(self, path: str) -> str | None:
        """The stack prefix a jaxft path starts with, or None when it is in no stack."""
        return next((p for p in dict.fromkeys(self.stacks) if path.startswith(p)), None)

    def home_path(self, path: str) -> str:
        """A path inside any stack, as the table writes it (under `home`)."""
        prefix = self.stack_of(path)
        return path if prefix is None else self.home + path[len(prefix):]


class TensorMapping:
    """The Hugging Face <-> jaxft name table of one family."""

    def __init__(
        self,
        entries: Iterable[tuple],
        *,
        aliases: Iterable[tuple[str, str, str]] = (),
        ignored: Iterable[str] = (),
        tied_head: tuple[str, str] | None = None,
        base_prefix: str = "",
        renames: Iterable[tuple[str, str]] = (),
    ):
        entries = tuple(entries)
        # (hf, path, transform) of every tensor export writes; `parts` holds the non-whole ones.
        self.entries = tuple(tuple(e[:3]) for e in entries)
        self.parts = {e[0]: e[3] for e in entries if len(e) > 3}
        self.aliases = tuple(aliases)
        self._patterns = [
            (re.compile(re.escape(hf).replace(re.escape("{L}"), r"(?P<L>\d+)")
                        .replace(re.escape("{E}"), r"(?P<E>\d+)") + "$"),
             hf, path, transform)
            for hf, path, transform in self.entries + self.aliases
        ]
        self.ignored = [re.compile(p + "$") for p in ignored]
        # (head, embedding): a tied checkpoint may still list its head, which must then be the
        # embedding itself; it is checked and skipped.
        self.tied_head = tied_head
        self.base_prefix = base_prefix  # HF's base_model_prefix plus ".": absent in base models
        self.renames = tuple(renames)  # legacy suffixes, e.g. (".gamma", ".weight")
        # Where the per-layer modules live ('model.layers.'): jaxft stacks them under the same
        # path, without the layer index.
        self.stacked_prefixes = tuple(sorted({hf.split("{L}")[0] for hf, _, _ in self.entries
                                              if "{L}" in hf}))
        self.placement: LayerPlacement | None = None

    def placed(self, placement: LayerPlacement | None) -> TensorMapping:
        """This table for a model whose layers `placement` spreads over several stacks."""
        if placement is None:
            return self
        table = copy.copy(self)
        table.placement = placement
        return table

    def _home(self, path: str) -> str:
        """A jaxft path as the table writes it (a placed stack's path under the home stack)."""
        return path if self.placement is None else self.placement.home_path(path)

    def place(self, path: str, layer: int | None) -> tuple[str, int | None]:
        """(path, index) of one layer's slice of a table path, in the stack that holds it."""
        if (self.placement is None or layer is None or layer >= len(self.placement.stacks)
                or not path.startswith(self.placement.home)):
            return path, layer
        prefix, index = self.placement.place(layer)
        return prefix + path[len(self.placement.home):], index

    def layers_of(self, path: str, num_layers: int) -> list[int]:
        """The Hugging Face layers whose slices a stacked jaxft path holds, in order."""
        if self.placement is not None and self.placement.stack_of(path) is not None:
            return self.placement.layers_of(self.placement.stack_of(path))
        return list(range(num_layers))

    def layer_paths(self, path: str, num_layers: int) -> list[str]:
        """The Hugging Face module paths a jaxft module path stands for: one per layer inside
        the stack (`model.layers.mlp.up_proj` -> `model.layers.0.mlp.up_proj`, …), else itself."""
        home = self._home(path)
        for stack in self.stacked_prefixes:
            if home.startswith(stack):
                return [f"{stack}{i}.{home[len(stack):]}"
                        for i in self.layers_of(path, num_layers)]
        return [path]

    def entry(self, path: str) -> tuple[str, str] | None:
        """(Hugging Face name with `{L}`, transform) of the tensor export writes for a jaxft
        parameter path (of any stack), or None."""
        home = self._home(path)
        return next(((hf, transform) for hf, p, transform in self.entries if p == home), None)

    def normalize(self, hf_name: str) -> str:
        """The canonical name: legacy suffixes renamed, the base-model prefix added if absent."""
        for old, new in self.renames:
            if hf_name.endswith(old):
                hf_name = hf_name[: -len(old)] + new
        if self.base_prefix and not self.match(hf_name):
            if self.match(self.base_prefix + hf_name):
                return self.base_prefix + hf_name
        return hf_name

    def match(self, hf_name: str) -> tuple[str, int | None, str] | None:
        """(jaxft path, layer index or None, transform) for a canonical HF name."""
        hit = self.locate(hf_name)
        return None if hit is None else (hit.path, hit.layer, hit.transform)

    def locate(self, hf_name: str) -> Hit | None:
        """Where a canonical HF name goes, or None when no entry or alias names it."""
        for pattern, hf, path, transform in self._patterns:
            m = pattern.match(hf_name)
            if m:
                found = m.groupdict()
                path, layer = self.place(path, None if found.get("L") is None
                                          else int(found["L"]))
                return Hit(path, layer, None if found.get("E") is None else int(found["E"]),
                           self.parts.get(hf, WHOLE), transform)
        return None

    def grid(self, path: str) -> tuple[bool, bool, int]:
        """How finely tensors may fill a parameter: (it is stacked over layers, some tensor
        holds one expert, the most pieces its last axis is cut into)."""
        home = self._home(path)
        names = [hf for hf, p, _ in self.entries + self.aliases if p == home]
        return (any("{L}" in hf for hf in names), any("{E}" in hf for hf in names),
                max((self.parts.get(hf, WHOLE).of for hf in names), default=1))

    def name_of(self, path: str, layer: int | None = None, expert: int | None = None,
                piece: tuple[int, int] = (0, 1)) -> str | None:
        """The exported Hugging Face name of one layer's, expert's and piece's tensor of a
        parameter (what a message about a missing tensor names). `layer` is the index in the
        parameter's own stack."""
        if self.placement is not None and self.placement.stack_of(path) is not None:
            layer = self.layers_of(path, 0)[layer or 0]
        path = self._home(path)
        for hf, entry_path, _ in self.entries:
            part = self.parts.get(hf, WHOLE)
            if entry_path != path:
                continue
            if part.of > 1 and piece[0] * part.of // piece[1] != part.index:
                continue
            return (hf.replace("{L}", str(0 if layer is None else layer))
                    .replace("{E}", str(0 if expert is None else expert)))
        return None

    def is_ignored(self, hf_name: str, tied: bool) -> bool:
        if tied and self.tied_head is not None and hf_name == self.tied_head[0]:
            return True
        # a base model's checkpoint names its buffers without the base-model prefix
        names = (hf_name, self.base_prefix + hf_name) if self.base_prefix else (hf_name,)
        return any(p.match(name) for p in self.ignored for name in names)


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """`{"model.layers.self_attn.q_proj.kernel": Variable}` for every variable in a state."""
    flat = {}
    for path, var in nnx.to_flat_state(state):
        flat[".".join(str(p) for p in path)] = var
    return flat


def load_state(
    abstract: nnx.State,
    mapping: TensorMapping,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    source: str,
    tied: bool,
    num_layers: int,
    may_be_missing: Callable[[str], bool] = lambda path: False,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    encoders: Mapping[str, Encoding] | None = None,
) -> nnx.State:
    """Fill an abstract state (from `nnx.eval_shape`) with Hugging Face tensors.

    Returns `(state, missing)`: parameters allowed to be missing (`may_be_missing(path)`) keep
    their abstract value and are listed in `missing`, for the caller to initialise. Every other
    missing tensor, shape mismatch and bad layer index is collected and raised once.

    `encoders` maps a table path that the state holds in another form (a packed, quantized
    kernel) to how each tensor (one layer's slice) becomes that form's arrays, `path.<name>`,
    as it is read: the unencoded tensor is never kept.
    """
    variables = flat_variables(abstract)
    encoders = dict(encoders or {})
    buffers: dict[str, np.ndarray] = {}
    # table path -> which (layer, expert, piece) cells tensors have filled
    covered: dict[str, np.ndarray] = {}
    problems: list[str] = []
    unexpected: list[str] = []
    rejected: set[str] = set()  # reported already: not missing as well
    tied_digests: dict[str, str] = {}  # a tied head and its embedding, when both are listed
    place = place or (lambda var, array: jnp.asarray(array))

    def cells(path: str, full_shape: tuple[int, ...]) -> np.ndarray:
        if path not in covered:
            stacked, per_expert, pieces = mapping.grid(path)
            experts = full_shape[1 if stacked else 0] if per_expert else 1
            covered[path] = np.zeros((full_shape[0] if stacked else 1, experts, pieces), bool)
        return covered[path]

    def mark(hit: Hit, grid: np.ndarray) -> None:
        pieces = grid.shape[2]
        step = pieces // hit.part.of
        grid[slice(None) if hit.layer is None else hit.layer,
             slice(None) if hit.expert is None else hit.expert,
             hit.part.index * step:(hit.part.index + 1) * step] = True

    def store(path: str, hit: Hit, value: np.ndarray) -> None:
        var = variables[path]
        dtype = var.get_value().dtype
        full = var.get_value().shape
        if hit.layer is None and hit.expert is None and hit.part.of == 1:
            buffers[path] = value.astype(dtype)
            return
        if path not in buffers:
            buffers[path] = np.empty(full, dtype)
        buffers[path][hit.target(full)] = value.astype(dtype)

    for raw_name, array in tensors:
        name = mapping.normalize(raw_name)
        if tied and mapping.tied_head is not None and name in mapping.tied_head:
            tied_digests[name] = _digest(array)
        hit = mapping.locate(name)
        if hit is None or (hit.path not in variables and hit.path not in encoders):
            if not mapping.is_ignored(name, tied):
                unexpected.append(raw_name)
            continue
        path = hit.path
        encoder = encoders.get(path)
        full_shape = tuple(encoder.shape if encoder else variables[path].get_value().shape)
        grid = cells(path, full_shape)
        value = _TRANSFORMS[hit.transform][0](np.asarray(array))
        expected = hit.shape_in(full_shape)
        if hit.layer is not None and hit.layer >= num_layers:
            problems.append(
                f"tensor {raw_name} is for layer {hit.layer} but the config has {num_layers} "
                "layers"
            )
            continue
        if hit.expert is not None and hit.expert >= grid.shape[1]:
            problems.append(f"tensor {raw_name} is for expert {hit.expert} but the config has "
                            f"{grid.shape[1]} experts")
            continue
        if value.shape != tuple(expected):
            if hit.layer is None:
                rejected.add(path)
            mark(hit, grid)
            hf_shape = _TRANSFORMS[hit.transform][1](np.empty(expected, np.uint8)).shape
            problems.append(
                f"tensor {raw_name} has shape {tuple(array.shape)} but the model "
                f"expects {tuple(hf_shape)}"
            )
            continue
        if encoder is None:
            store(path, hit, value)
        else:
            for part, part_value in encoder.encode(value.astype(encoder.dtype)).items():
                store(f"{path}.{part}", hit, part_value)
        mark(hit, grid)

    if len(tied_digests) == 2 and len(set(tied_digests.values())) == 2:
        head, embedding = mapping.tied_head
        problems.append(f"config.json ties the output head to the embedding "
                        f"(tie_word_embeddings), but the checkpoint's {head} differs from its "
                        f"{embedding}")
    encoded_parts = {v for v in variables if v.rsplit(".", 1)[0] in encoders}
    missing_paths = []
    for path in [v for v in variables if v not in encoded_parts] + list(encoders):
        if path in rejected:
            continue
        if path not in covered:
            if may_be_missing(path):
                missing_paths.append(path)
            else:
                hf_name = mapping.name_of(path)
                problems.append(f"missing tensor {hf_name}" if hf_name
                                else f"no Hugging Face name maps to {path}")
        elif not covered[path].all():
            layer, expert, piece = (int(i) for i in np.argwhere(~covered[path])[0])
            hf_name = mapping.name_of(path, layer, expert, (piece, covered[path].shape[2]))
            problems.append(f"missing tensor {hf_name}")
    if problems:
        raise collected(source, problems)
    if unexpected:
        logging.warning(
            "%s: ignored %d tensors the model does not use: %s",
            source,
            len(unexpected),
            ", ".join(unexpected[:5]),
        )

    def fill(path_tuple, var):
        path = ".".join(str(p) for p in path_tuple)
        if path in missing_paths:
            return var
        return var.replace(value=place(var, buffers.pop(path)))

    state = nnx.from_flat_state([(p, fill(p, v)) for p, v in nnx.to_flat_state(abstract)])
    return state, missing_paths


def _digest(array: np.ndarray) -> str:
    """A fingerprint of a tensor's values (its dtype and shape included)."""
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


class Encoding(Protocol):
    """What `load_state` needs of an encoder (see `jaxft.quant.Encoder`)."""

    shape: tuple[int, ...]  # the tensor's full shape in jaxft's layout, layers included
    dtype: np.dtype  # the parameter dtype each tensor is cast to before `encode`

    def encode(self, value: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One Hugging Face tensor of a state, gathered to the host only when `fetch` is called.

    A stacked parameter yields one of these per layer, so an export holds one layer's slice at a
    time, never a whole stack."""

    name: str
    shape: tuple[int, ...]  # in Hugging Face's layout
    dtype: np.dtype
    source: jax.Array  # the parameter (all layers when stacked)
    index: tuple  # this tensor's slice of it: (layer, expert, piece of the last axis) as held
    transform: str

    def fetch(self) -> np.ndarray:
        value = self.source[self.index] if self.index else self.source
        return _TRANSFORMS[self.transform][1](to_host(value))

    def nbytes(self, float_dtype: str) -> int:
        """Bytes on disk when floating-point tensors are written as `float_dtype`."""
        floating = jnp.issubdtype(self.dtype, jnp.floating)
        itemsize = jnp.dtype(float_dtype if floating else self.dtype).itemsize
        return math.prod(self.shape) * itemsize


def to_host(value: jax.Array) -> np.ndarray:
    """A whole host copy of an array, also one spread over the devices of several processes
    (every process must then call this, as for any collective)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def export_plan(
    state: nnx.State, mapping: TensorMapping, *, num_layers: int, with_base_prefix: bool = True
) -> list[ExportTensor]:
    """Every parameter of the state as Hugging Face tensors, in table order, nothing fetched."""
    variables = flat_variables(state)
    plan = []
    for hf, table_path, transform in mapping.entries:
        name = hf
        if not with_base_prefix and mapping.base_prefix and hf.startswith(mapping.base_prefix):
            name = hf[len(mapping.base_prefix) :]
        for layer in range(num_layers) if "{L}" in hf else [None]:
            path, index = mapping.place(table_path, layer)
            if path not in variables:
                continue
            value = variables[path].get_value()
            experts = range(value.shape[1 if "{L}" in hf else 0]) if "{E}" in hf else [None]
            for expert in experts:
                hit = Hit(path, index, expert, mapping.parts.get(hf, WHOLE), transform)
                shape = hit.shape_in(tuple(value.shape))
                hf_shape = _TRANSFORMS[transform][1](np.empty(shape, np.uint8)).shape
                plan.append(ExportTensor(
                    name.replace("{L}", str(layer)).replace("{E}", str(expert)), hf_shape,
                    np.dtype(value.dtype), value, hit.target(tuple(value.shape)), transform))
    return plan


def export_tensors(
    state: nnx.State, mapping: TensorMapping, *, num_layers: int, with_base_prefix: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, array) for every parameter in the state, one at a time."""
    for tensor in export_plan(state, mapping, num_layers=num_layers,
                              with_base_prefix=with_base_prefix):
        yield tensor.name, tensor.fetch()
