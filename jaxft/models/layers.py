"""The primitives every model family is built from: parameters with logical axes, dropout,
projections (`Linear`, which LoRA and the quantized base attach to), embeddings and norms, and
the one walk over a model's projections (`linear_modules`).

Attention lives in `attention`, rotary embeddings in `rope`, scanned layer stacks in `stack`.

Einsum axis letters used throughout the models:
  B batch, T query positions, S key positions, D model width, F MLP width,
  N query heads, K key/value heads, G query heads per key/value head (N = K·G), H head dim, V vocab.

Every parameter carries `axes`: a tuple of logical axis names, one per array dimension. They mean
nothing to the model; `jaxft.sharding` maps them onto a device mesh through one rules table.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: tuple, dtype) -> nnx.Param:
    """A parameter with its logical axis names attached."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=axes)


# transformers' `initializer_range`: the standard deviation its `_init_weights` draws every
# projection, embedding and expert weight from. Weights loaded from a checkpoint overwrite the
# draw; a model trained from scratch keeps it.
_INIT_STD: contextvars.ContextVar[float] = contextvars.ContextVar("init_std", default=0.02)


def weight_init() -> Callable:
    """normal(0, initializer_range), as transformers initialises weight matrices."""
    return nnx.initializers.normal(_INIT_STD.get())


@contextlib.contextmanager
def initializer_range(std: float) -> Iterator[None]:
    """Models built inside draw their weights at this standard deviation."""
    token = _INIT_STD.set(float(std))
    try:
        yield
    finally:
        _INIT_STD.reset(token)


class DropoutKey(nnx.Variable):
    """A dropout PRNG key: neither trained nor saved; the train step writes a fresh one (per
    layer when stacked) every step, derived from the step number, so a resumed run repeats it."""


class Dropout(nnx.Module):
    """Inverted dropout at `rate`, with its own key (`layers` leading keys when it is created
    inside an already stacked module, as LoRA's are).

    Off when `deterministic` is set: `model.eval()`, which `jaxft.from_pretrained` applies as
    transformers' `from_pretrained` does; training calls `model.train()`. A rate of 0 holds no
    key and costs nothing.
    """

    def __init__(self, rate: float, *, layers: int | None = None):
        lead = () if layers is None else (layers,)
        self.rate = rate
        self.key = (DropoutKey(jnp.zeros((*lead, 2), jnp.uint32),
                               axes=("layers", None) if lead else (None,))
                    if rate > 0 else None)
        self.deterministic = False

    @property
    def active(self) -> bool:
        return self.key is not None and not self.deterministic

    def __call__(self, x: Array) -> Array:
        if not self.active:
            return x
        keep = jax.random.bernoulli(self.key[...], 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


class Linear(nnx.Module):
    """`x @ kernel + bias`, with the kernel stored [in, out] and an optional additive adapter.

    `adapter` is None unless LoRA is applied (`jaxft.lora`); the model never needs to know what
    the adapter is, only that its output, given the input, the weight and the projection before
    its bias, adds to the projection.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        bias: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=None,
    ):
        self.kernel = param(rngs, weight_init(), (d_in, d_out), axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (d_out,), (axes[1],), param_dtype) if bias else None
        )
        self.adapter: nnx.Module | None = nnx.data(None)
        self.dtype = dtype

    @property
    def packed(self) -> bool:
        """The kernel is a frozen, quantized one (`jaxft.quant`): any module that stands in for
        a [in, out] weight through `dequantize(dtype)`."""
        return not isinstance(self.kernel, nnx.Variable)

    @property
    def kernel_dtype(self):
        return self.kernel.dtype if self.packed else self.kernel[...].dtype

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """[*layers, in, out], packed or not (outside the layer scan: the whole stack's)."""
        return tuple(self.kernel.shape)

    @property
    def kernel_axes(self) -> tuple:
        """The kernel's logical axis names, packed or not."""
        if self.packed:
            return self.kernel.axes
        return tuple(self.kernel.get_metadata().get("axes") or (None,) * self.kernel.ndim)

    def weight(self, dtype) -> Array:
        """The kernel [in, out] in `dtype`; a packed kernel is dequantized here, inside the
        projection, so only one layer's dense weight ever exists, and only transiently."""
        return self.kernel.dequantize(dtype) if self.packed else self.kernel[...].astype(dtype)

    def _packed_matmul(self, x: Array, dtype) -> Array:
        """x @ dequantize(kernel), rematerialised: the backward pass dequantizes again rather
        than keep every layer's dense weight from the forward pass (which, under the layer scan
        without remat, would hold the whole base in the compute dtype after all)."""
        graphdef, packed = nnx.split(self.kernel)

        def project(inputs, state):
            return inputs @ nnx.merge(graphdef, state).dequantize(dtype)

        return jax.checkpoint(project)(x.astype(dtype), packed)

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or self.kernel_dtype
        # Flattened to [tokens, in]: with the leading axes kept, XLA:CPU lays out the weight
        # gradients of the stacked layers (and LoRA's) as strided transposes that cost more than
        # the matmuls themselves.
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        weight = self.weight(dtype)  # XLA drops it where nothing below reads it
        y = self._packed_matmul(x, dtype) if self.packed else x.astype(dtype) @ weight
        # An adapter sees the weight and the projection before its bias: DoRA rescales both.
        extra = (None if self.adapter is None
                 else self.adapter(x, weight=weight, projected=y).astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if extra is not None:
            y = y + extra
        return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
    """A token (or position) table [V, D]; `attend` reuses it as a tied output head."""

    def __init__(
        self,
        num: int,
        dim: int,
        axes: tuple[str, str],
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=None,
    ):
        self.embedding = param(rngs, weight_init(), (num, dim), axes, param_dtype)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)

    def attend(self, x: Array) -> Array:
        """Logits against the table, for tied input/output embeddings."""
        dtype = self.dtype or self.embedding[...].dtype
        return jnp.einsum("btd,vd->btv", x.astype(dtype), self.embedding[...].astype(dtype))

    def as_head(self) -> Array:
        """The table as a [D, V] output-head matrix in the compute dtype (tied embeddings), for
        a loss that fuses the head with the cross-entropy."""
        return self.embedding[...].T.astype(self.dtype or self.embedding[...].dtype)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm, computed in float32 and cast back before the scale, exactly as HF does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """GPT-2/BERT LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...] + self.bias[...]).astype(x.dtype)


def linear_modules(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """Every `Linear` in the model with its dotted jaxft path: what LoRA adapts, what a
    quantized base packs, what the FLOPs model counts."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            yield ".".join(str(p) for p in path), module


# Output heads never get adapters under 'all-linear' and stay dense in a quantized base: PEFT
# leaves out the output embedding (`lm_head`) and a sequence classifier's head (`classifier`,
# `score`), and bitsandbytes keeps them in their dtype.
OUTPUT_HEADS = ("lm_head", "classifier", "score")


def is_output_head(path: str) -> bool:
    """The one rule for what 'all-linear' and a quantized base leave alone."""
    return path.rsplit(".", 1)[-1] in OUTPUT_HEADS
