"""Floating-point dtypes as users write them, reduced to the three names jaxft works in.

A JAX user writes `jnp.bfloat16`, a NumPy user `np.float32` or `np.dtype("float16")`, a config
file or command line `"bfloat16"`, a PyTorch user `torch.bfloat16`: every one of them is taken
wherever jaxft takes a dtype (loading, saving, export, merging, generation, configs). Inside,
a dtype is its canonical name, so configs and checkpoint fingerprints compare as plain strings.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxft.errors import JaxftError

NAMES = ("float32", "bfloat16", "float16")
# What `.astype` takes for each name on the host (NumPy has no bfloat16 of its own).
_NUMPY = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTypeLike = Any  # str, a jnp/np scalar type, np.dtype, or torch.dtype


def canonical(dtype: DTypeLike, what: str = "dtype", also: tuple[str, ...] = ()) -> str:
    """'float32', 'bfloat16' or 'float16' for any spelling of those; one line naming `what`
    (the argument or config field) for anything else, listing `also` (names the caller accepts
    besides dtypes, such as 'auto') among the expected values."""
    name = dtype
    if not isinstance(dtype, str):
        text = str(dtype)
        if text.startswith("torch."):  # torch.bfloat16: named like ours, without importing torch
            name = text[len("torch."):]
        else:
            try:
                name = jnp.dtype(dtype).name
            except (TypeError, ValueError):
                name = None
    elif dtype not in NAMES:
        try:
            name = jnp.dtype(dtype).name
        except (TypeError, ValueError):
            name = None
    if name not in NAMES:
        raise JaxftError(f"{what} is {_show(dtype)}, expected one of "
                         f"{', '.join((*also, *NAMES))} (a name, or a dtype such as jnp.bfloat16)")
    return name


def jax_dtype(dtype: DTypeLike, what: str = "dtype") -> jnp.dtype:
    """The JAX dtype of any accepted spelling."""
    return jnp.dtype(canonical(dtype, what))


def numpy_type(dtype: DTypeLike, what: str = "dtype") -> type:
    """The host scalar type of any accepted spelling (ml_dtypes' bfloat16 for bfloat16)."""
    return _NUMPY[canonical(dtype, what)]


def _show(dtype: DTypeLike) -> str:
    if isinstance(dtype, type):
        return f"{dtype.__module__}.{dtype.__qualname__}"
    return repr(dtype)
