"""One table per model family, read both ways: Hugging Face tensors in, Hugging Face tensors out.

A family declares `TensorMapping(((hf_name, jaxft_path, transform), ...))`. `{L}` in a Hugging
Face name is the layer index, which selects a slice of the stacked layer arrays in the jaxft path.
Transforms come from a closed, invertible set, so export never needs a hand-written inverse.
Loading streams tensors one at a time into preallocated buffers, collects every problem, and
raises once with all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import JaxftError

IDENTITY = "identity"
TRANSPOSE = "transpose"
# transform -> (Hugging Face -> jaxft, jaxft -> Hugging Face)
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    IDENTITY: (lambda a: a, lambda a: a),
    TRANSPOSE: (lambda a: a.T, lambda a: a.T),
}
MAX_LISTED_PROBLEMS = 8


class TensorMapping:
    """The Hugging Face <-> jaxft name table of one family."""

    def __init__(
        self,
        entries: Iterable[tuple[str, str, str]],
        *,
        ignored: Iterable[str] = (),
        ignored_when_tied: Iterable[str] = (),
        base_prefix: str = "",
        renames: Iterable[tuple[str, str]] = (),
    ):
        self.entries = tuple(entries)
        self._patterns = [
            (re.compile(re.escape(hf).replace(re.escape("{L}"), r"(\d+)") + "$"), path, transform)
            for hf, path, transform in self.entries
        ]
        self.ignored = [re.compile(p + "$") for p in ignored]
        self.ignored_when_tied = [re.compile(p + "$") for p in ignored_when_tied]
        self.base_prefix = base_prefix  # HF's base_model_prefix plus ".": absent in base models
        self.renames = tuple(renames)  # legacy suffixes, e.g. (".gamma", ".weight")
        # Where the per-layer modules live ('model.layers.'): jaxft stacks them under the same
        # path, without the layer index.
        self.stacked_prefixes = tuple(sorted({hf.split("{L}")[0] for hf, _, _ in self.entries
                                              if "{L}" in hf}))

    def layer_paths(self, path: str, num_layers: int) -> list[str]:
        """The Hugging Face module paths a jaxft module path stands for: one per layer inside
        the stack (`model.layers.mlp.up_proj` -> `model.layers.0.mlp.up_proj`, …), else itself."""
        for stack in self.stacked_prefixes:
            if path.startswith(stack):
                return [f"{stack}{i}.{path[len(stack):]}" for i in range(num_layers)]
        return [path]

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
        for pattern, path, transform in self._patterns:
            m = pattern.match(hf_name)
            if m:
                return path, (int(m.group(1)) if m.groups() else None), transform
        return None

    def is_ignored(self, hf_name: str, tied: bool) -> bool:
        patterns = self.ignored + (self.ignored_when_tied if tied else [])
        return any(p.match(hf_name) for p in patterns)


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
) -> nnx.State:
    """Fill an abstract state (from `nnx.eval_shape`) with Hugging Face tensors.

    Returns `(state, missing)`: parameters allowed to be missing (`may_be_missing(path)`) keep
    their abstract value and are listed in `missing`, for the caller to initialise. Every other
    missing tensor, shape mismatch and bad layer index is collected and raised once.
    """
    variables = flat_variables(abstract)
    buffers: dict[str, np.ndarray] = {}
    seen_layers: dict[str, set[int]] = {}
    problems: list[str] = []
    unexpected: list[str] = []
    rejected: set[str] = set()  # reported already: not missing as well
    place = place or (lambda var, array: jnp.asarray(array))

    for raw_name, array in tensors:
        name = mapping.normalize(raw_name)
        hit = mapping.match(name)
        if hit is None or hit[0] not in variables:
            if not mapping.is_ignored(name, tied):
                unexpected.append(raw_name)
            continue
        path, layer, transform = hit
        var = variables[path]
        value = _TRANSFORMS[transform][0](np.asarray(array))
        expected = var.get_value().shape[1:] if layer is not None else var.get_value().shape
        if layer is not None and layer >= num_layers:
            problems.append(
                f"tensor {raw_name} is for layer {layer} but the config has {num_layers} layers"
            )
            continue
        if value.shape != tuple(expected):
            rejected.add(path) if layer is None else seen_layers.setdefault(path, set()).add(layer)
            hf_shape = _TRANSFORMS[transform][1](np.empty(expected, np.uint8)).shape
            problems.append(
                f"tensor {raw_name} has shape {tuple(array.shape)} but the model "
                f"expects {tuple(hf_shape)}"
            )
            continue
        dtype = var.get_value().dtype
        if layer is None:
            buffers[path] = value.astype(dtype)
        else:
            if path not in buffers:
                buffers[path] = np.empty(var.get_value().shape, dtype)
            buffers[path][layer] = value.astype(dtype)
            seen_layers.setdefault(path, set()).add(layer)

    missing_paths = []
    for path in variables:
        hf_name = _hf_name(mapping, path)
        if path in rejected:
            continue
        if path not in buffers and path not in seen_layers:
            if may_be_missing(path):
                missing_paths.append(path)
            else:
                problems.append(
                    f"missing tensor {hf_name.replace('{L}', '0')}"
                    if hf_name
                    else f"no Hugging Face name maps to {path}"
                )
        elif path in seen_layers and len(seen_layers[path]) != num_layers:
            gap = min(set(range(num_layers)) - seen_layers[path])
            problems.append(f"missing tensor {hf_name.replace('{L}', str(gap))}")
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS]) + (
            f"; and {more} more" if more > 0 else ""
        )
        raise JaxftError(f"{source}: {listed}")
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


def _hf_name(mapping: TensorMapping, path: str) -> str | None:
    for hf, entry_path, _ in mapping.entries:
        if entry_path == path:
            return hf
    return None


def export_tensors(
    state: nnx.State, mapping: TensorMapping, *, num_layers: int, with_base_prefix: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, array) for every parameter in the state, one at a time."""
    variables = flat_variables(state)
    for hf, path, transform in mapping.entries:
        if path not in variables:
            continue
        value = np.asarray(jax.device_get(variables[path].get_value()))
        if not with_base_prefix and mapping.base_prefix and hf.startswith(mapping.base_prefix):
            hf = hf[len(mapping.base_prefix) :]
        if "{L}" in hf:
            for layer in range(num_layers):
                yield hf.replace("{L}", str(layer)), _TRANSFORMS[transform][1](value[layer])
        else:
            yield hf, _TRANSFORMS[transform][1](value)
