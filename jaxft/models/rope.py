"""Rotary position embeddings as transformers computes them: the inverse frequencies of each
`rope_type` (default, linear, llama3, longrope, yarn), in float32, and HF's half-split rotation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import JaxftError

Array = jax.Array


ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def _powers(dim: int, theta: float) -> np.ndarray:
    """θ^(2i/d) for the [d/2] rotated pairs, in float32 as transformers computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(theta) ** exponents).astype(np.float32)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """The [H/2] inverse frequencies, computed in float32 as transformers does (`head_dim` is
    the rotated width: less than the head with partial rotary embeddings). For longrope these
    are the short-context ones (`longrope_frequencies` gives both sets)."""
    inv_freq = (1.0 / _powers(head_dim, theta)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "longrope":
        return longrope_frequencies(head_dim, theta, scaling)[0]
    if rope_type == "yarn":
        return yarn_frequencies(head_dim, theta, scaling)[0]
    if rope_type == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise JaxftError(
        f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    )


def longrope_frequencies(dim: int, theta: float, scaling: dict) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE's (Phi-3) short- and long-context inverse frequencies, `1 / (factor · θ^(i/d))`
    with the per-frequency `short_factor` and `long_factor`, as transformers computes them."""
    powers = _powers(dim, theta)
    short, long = (np.asarray(scaling[k], np.float32) for k in ("short_factor", "long_factor"))
    return ((1.0 / (short * powers)).astype(np.float32),
            (1.0 / (long * powers)).astype(np.float32))


def yarn_frequencies(dim: int, theta: float, scaling: dict,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
    """YaRN's inverse frequencies and attention factor (cos and sin are multiplied by it), as
    transformers' `_compute_yarn_parameters` computes them: each frequency blends the
    interpolated (÷ factor) and the original one by a linear ramp between the dimensions that
    turn `beta_fast` and `beta_slow` times over `original_max_position_embeddings` positions."""
    original, factor = _context_scaling("yarn", scaling, max_position_embeddings)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers avoids the singular ramp
    powers = _powers(dim, theta)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrapolated = (1 - ramp).astype(np.float32)
    inv_freq = ((1.0 / (np.float32(factor) * powers)) * (1 - extrapolated)
                + (1.0 / powers) * extrapolated).astype(np.float32)
    return inv_freq, float(attention_factor)


def _context_scaling(kind: str, scaling: dict,
                     max_position_embeddings: int | None) -> tuple[int, float]:
    """(original_max_position_embeddings, factor) of a context-extending scaling; without a
    factor, transformers takes the ratio of the model's positions to the original ones."""
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise JaxftError(f"{kind} rope_scaling needs original_max_position_embeddings")
    return original, scaling.get("factor") or (max_position_embeddings or original) / original


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's eq. 21, `0.1 · mscale · ln(scale) + 1` (1 when not scaled up)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary embedding of one kind of layer, as plain (hashable) numbers.

    `inv_freq` rotates the first `2·len(inv_freq)` dims of each head (all of them unless the
    embedding is partial, as Phi-4-mini's is); cos and sin are multiplied by `scale` (longrope's
    attention factor). With `long_inv_freq`, a batch whose largest position reaches past
    `original_max` uses those instead, the rule transformers applies per forward call.
    """

    inv_freq: tuple[float, ...]
    scale: float = 1.0
    long_inv_freq: tuple[float, ...] | None = None
    original_max: int | None = None

    @classmethod
    def from_hf(cls, head_dim: int, theta: float, scaling: dict | None, *,
                partial_rotary_factor: float = 1.0,
                max_position_embeddings: int | None = None) -> Rope:
        """From config.json's rope settings, with transformers' defaults for longrope."""
        dim = int(head_dim * partial_rotary_factor)
        scaling = scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "yarn":
            inv_freq, attention_factor = yarn_frequencies(dim, theta, scaling,
                                                          max_position_embeddings)
            return cls(tuple(inv_freq.tolist()), attention_factor)
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            return cls(tuple(rope_inverse_frequencies(dim, theta, scaling or None).tolist()))
        original, factor = _context_scaling("longrope", scaling, max_position_embeddings)
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = (1.0 if factor <= 1.0
                                else math.sqrt(1 + math.log(factor) / math.log(original)))
        short, long = longrope_frequencies(dim, theta, scaling)
        return cls(tuple(short.tolist()), float(attention_factor), tuple(long.tolist()),
                   int(original))

    def frequencies(self, positions: Array) -> Array:
        """The inverse frequencies [R/2] for a call at these positions."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if self.long_inv_freq is None:
            return inv_freq
        long = jnp.max(positions) + 1 > self.original_max
        return jnp.where(long, jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)

    def __call__(self, x: Array, positions: Array, inv_freq: Array | None = None) -> Array:
        """x [B,T,heads,H] rotated by its positions [B,T]."""
        if inv_freq is None:
            inv_freq = self.frequencies(positions)
        return apply_rope(x, positions, inv_freq, self.scale)


def apply_rope(x: Array, positions: Array, inv_freq: Array, scale: float = 1.0) -> Array:
    """Rotate x [B,T,heads,H] by its positions [B,T], HF's half-split layout (rotate_half);
    only the first `2·len(inv_freq)` dims when the embedding is partial."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # B T R/2
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # B T 1 R
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rotary = emb.shape[-1]
    x, passed = x[..., :rotary], x[..., rotary:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos + rotated * sin
    return out if passed.shape[-1] == 0 else jnp.concatenate([out, passed], axis=-1)
