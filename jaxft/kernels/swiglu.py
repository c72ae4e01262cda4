"""LLaMA's gated MLP activation with a backward that keeps only its two inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up`, LLaMA's gated MLP activation, in float32 and cast back.

    Its backward keeps only `gate` and `up` (the projections' outputs, which exist anyway) and
    recomputes the sigmoid: plain autodiff also stores sigmoid(gate), silu(gate) and their
    products per layer, and reading those back costs more than the arithmetic.
    """
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
    gate, up = residuals
    g, u, dy32 = gate.astype(jnp.float32), up.astype(jnp.float32), dy.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    dgate = dy32 * u * sig * (1.0 + g * (1.0 - sig))
    return dgate.astype(gate.dtype), (dy32 * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
