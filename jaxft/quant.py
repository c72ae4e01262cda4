"""A frozen base in 4 or 8 bits under LoRA: bitsandbytes' NF4 (QLoRA), per-channel int8, and
MXFP4 for a mixture of experts' experts.

NF4 is the QLoRA paper's 4-bit NormalFloat (Dettmers et al. 2023) exactly as bitsandbytes
stores it, so a jaxft QLoRA run trains on the very weights a PEFT + bitsandbytes run does:

- blocks of `block_size` (64) consecutive weights along the input dimension (Hugging Face's
  row-major [out, in] order), each scaled by its absolute maximum into [-1, 1] and rounded to
  the nearest of the 16 NF4 values, two codes to a byte, the first in the high nibble;
- with double quantization (`bnb_4bit_use_double_quant`), the float32 block maxima minus their
  mean are themselves quantized, in blocks of 256, to bitsandbytes' 8-bit dynamic map.

int8 is LLM.int8's weight half: one absmax per output channel, `round(w · 127 / absmax)`
(bitsandbytes' `int8_vectorwise_quant`), applied here as a plain weight-only int8 (no outlier
decomposition of the activations).

MXFP4 is the OCP microscaling format gpt-oss's experts are released in (`jaxft.hf.mxfp4`): 32
consecutive inputs of an output share one power-of-two scale, each weight one E2M1 value. It
packs only experts, as OpenAI's release does (attention, routers and embeddings stay in the
parameter dtype); a released checkpoint's weights pack back into exactly the values it holds.

Experts' [E, in, out] weights take any of the three (`Experts` holds the packed module in place
of its parameter). NF4 on experts keeps float32 block maxima in whole rows (no double
quantization): bitsandbytes quantizes only `nn.Linear` modules, so there is no layout of its to
follow for them.

Weights are quantized on the host as the checkpoint streams in (`encoder`), live on the devices
packed (`NF4Weight`, `Int8Weight`, `MXFP4Weight`: modules a `Linear` or `Experts` holds in
place of its weight), and are dequantized inside each projection to the compute dtype
(`dequantize`). Their arrays are
`Quantized` variables, not parameters: no filter for what trains or for the parameter count
ever picks them up, and the optimizer never sees them. In jaxft's [in, out] layout the packed
codes are [in/2, out] and the block maxima [in/block, out], so fsdp and tensor sharding
split them along the kernel's own axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import JaxftError
from jaxft.models import experts as experts_lib
from jaxft.models.layers import Linear, is_output_head, linear_modules

NONE, NF4, INT8, MXFP4 = "none", "nf4", "int8", "mxfp4"
KINDS = (NONE, NF4, INT8, MXFP4)
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
ABSMAX_BLOCK = 256  # double quantization: block maxima quantized 256 at a time, as bitsandbytes

# The NF4 values: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero, as listed by the
# QLoRA paper (appendix E) and bitsandbytes' `get_4bit_type("nf4")`.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on x86-64 to the bit: a float32 step,
    the first half `start + step·i` and the second `end - step·(steps-1-i)`, each one fused
    multiply-add (float64 holds the float32 product exactly, so one rounding remains)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    forward = (step * i + np.float64(start32)).astype(np.float32)
    backward = (-step * (steps - 1 - i) + np.float64(end32)).astype(np.float32)
    return np.where(np.arange(steps) < steps // 2, forward, backward)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted float32
    values, a dynamic exponent with a shrinking fraction, which double quantization uses for
    the block maxima."""
    data: list[float] = []
    for i in range(7):
        bounds = _linspace32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-6 + i))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC_CODE = dynamic_map()


def _nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest value of a sorted code, by the float32 midpoints of neighbouring
    values (a tie goes down), as bitsandbytes' quantizers bucketize."""
    midpoints = (code[:-1] + code[1:]) / np.float32(2.0)
    return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)


def _blockwise(values: np.ndarray, block: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' blockwise absmax quantization of a flat float32 array (a short last
    block allowed): (codes, float32 maxima)."""
    n = values.size
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:n] = values
    padded = padded.reshape(blocks, block)
    absmax = np.abs(padded).max(axis=1)
    scale = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(padded * scale[:, None], -1.0, 1.0)
    return _nearest(scaled, code).reshape(-1)[:n], absmax


def double_quantize(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' double quantization of NF4's float32 block maxima (Hugging Face's order):
    `absmax - offset` to the 8-bit dynamic map in blocks of 256 -> (uint8 codes, float32
    maxima of the 256-blocks), each to the exactly nearest code.

    Two things bitsandbytes leaves to the device, and jaxft does not follow: its offset is
    torch's float32 mean, whose summation order depends on the device and the CPU's vector
    width (jaxft's is the correctly rounded mean: they can differ by an ulp), and its CPU
    kernel picks the nearest code with a tolerance, so a value within about 2e-5 of the
    midpoint of two codes may land on the other one.
    """
    return _blockwise(absmax.astype(np.float32) - np.float32(offset), ABSMAX_BLOCK, DYNAMIC_CODE)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the frozen base is stored: `kind` none | nf4 | int8; NF4's block size and double
    quantization (bitsandbytes' `bnb_4bit_use_double_quant`)."""

    kind: str = NONE
    block_size: int = 64
    double_quant: bool = False

    def check(self) -> None:
        if self.kind not in KINDS:
            raise JaxftError(f"lora.base_quant {self.kind!r} unknown (known: "
                             f"{', '.join(KINDS)})")
        if self.kind == NF4 and self.block_size not in BLOCK_SIZES:
            raise JaxftError(f"lora.quant_block_size must be one of "
                             f"{', '.join(map(str, BLOCK_SIZES))} (bitsandbytes' NF4 block "
                             f"sizes), got {self.block_size}")
        if self.kind in (INT8, MXFP4) and self.double_quant:
            raise JaxftError(f"lora.double_quant applies to nf4, not {self.kind}")

    @property
    def enabled(self) -> bool:
        return self.kind != NONE

    def quantizable(self, d_in: int) -> bool:
        """Whether a kernel with `d_in` inputs can be stored: NF4 packs two consecutive weights
        of a row into a byte, so its rows must have an even length (bitsandbytes would pack
        across rows otherwise)."""
        return self.kind == INT8 or d_in % 2 == 0


class Quantized(nnx.Variable):
    """A packed array of the frozen base (codes or scales): never trained, never counted as a
    parameter, never given optimizer state."""


class NF4Weight(nnx.Module):
    """A kernel [*layers, in, out] in NF4: `codes` [.., in/2, out] (two per byte), `absmax`
    (float32, or uint8 plus `absmax_scale` and `absmax_offset` with double quantization).
    `dtype` is the parameter dtype it stands in for.

    bitsandbytes blocks the weights in Hugging Face's row-major [out, in] order, flattened: when
    the block divides the input width, each block lies in one output channel and the maxima are
    kept [.., in/block, out], sharded along the kernel's own axes; otherwise blocks straddle
    rows, exactly as bitsandbytes makes them, and the maxima are kept flat, [.., blocks]
    (`rowwise` False), for every device."""

    def __init__(self, shape: tuple[int, ...], axes: tuple, dtype, cfg: QuantConfig):
        *lead, d_in, d_out = shape
        lead_axes, in_axis, out_axis = tuple(axes[:-2]), axes[-2], axes[-1]
        self.shape, self.axes, self.dtype = tuple(shape), tuple(axes), jnp.dtype(dtype)
        self.block_size = cfg.block_size
        self.rowwise = d_in % cfg.block_size == 0
        blocks = -(-d_in * d_out // cfg.block_size)  # bitsandbytes': a short last block allowed
        self.codes = Quantized(jnp.zeros((*lead, d_in // 2, d_out), jnp.uint8),
                               axes=(*lead_axes, in_axis, out_axis))
        absmax_dtype = jnp.uint8 if cfg.double_quant else jnp.float32
        if self.rowwise:
            self.absmax = Quantized(jnp.zeros((*lead, d_in // cfg.block_size, d_out),
                                              absmax_dtype), axes=(*lead_axes, in_axis, out_axis))
        else:
            self.absmax = Quantized(jnp.zeros((*lead, blocks), absmax_dtype),
                                    axes=(*lead_axes, None))
        if cfg.double_quant:
            groups = -(-blocks // ABSMAX_BLOCK)
            self.absmax_scale = Quantized(jnp.zeros((*lead, groups), jnp.float32),
                                          axes=(*lead_axes, None))
            self.absmax_offset = Quantized(jnp.zeros(tuple(lead), jnp.float32),
                                           axes=lead_axes)
        else:
            self.absmax_scale = self.absmax_offset = None

    def block_maxima(self) -> jax.Array:
        """The float32 block maxima in the layout `absmax` has, undoing double quantization
        as bitsandbytes does: code · scale of its group of 256 (in Hugging Face's order), +
        mean."""
        if self.absmax_scale is None:
            return self.absmax[...]
        q = self.absmax[...]
        if self.rowwise:
            *lead, blocks, d_out = q.shape
            flat = jnp.swapaxes(q, -1, -2).reshape(*lead, blocks * d_out)  # HF: [out, blocks]
        else:
            flat = q
        n = flat.shape[-1]
        scale = jnp.repeat(self.absmax_scale[...], ABSMAX_BLOCK, axis=-1)[..., :n]
        values = jnp.asarray(DYNAMIC_CODE)[flat] * scale + self.absmax_offset[...][..., None]
        if not self.rowwise:
            return values
        return jnp.swapaxes(values.reshape(*lead, d_out, blocks), -1, -2)

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense kernel [.., in, out]: code · block maximum in float32, then `dtype`."""
        codes = self.codes[...]
        *lead, half, d_out = codes.shape
        d_in = 2 * half
        pairs = jnp.stack([codes >> 4, codes & 0xF], axis=-2)  # [.., in/2, 2, out]
        maxima = self.block_maxima()
        if self.rowwise:
            values = jnp.asarray(NF4_CODE)[pairs.reshape(*lead, -1, self.block_size, d_out)]
            dense = values * maxima[..., :, None, :]
        else:  # each weight's block, by its place in Hugging Face's flat [out, in] order
            values = jnp.asarray(NF4_CODE)[pairs.reshape(*lead, d_in, d_out)]
            flat = (jnp.arange(d_out)[None, :] * d_in + jnp.arange(d_in)[:, None])  # in out
            dense = values * jnp.take(maxima, flat // self.block_size, axis=-1)
        return dense.reshape(*lead, d_in, d_out).astype(dtype or self.dtype)

    @staticmethod
    def encode(kernel: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
        """One layer's kernel [in, out] (host, any float dtype) -> this module's arrays."""
        d_in, d_out = kernel.shape
        hf_order = np.ascontiguousarray(kernel.astype(np.float32).T).reshape(-1)
        q, absmax = _blockwise(hf_order, cfg.block_size, NF4_CODE)
        q = q.reshape(d_out, d_in)
        out = {"codes": ((q[:, 0::2] << 4) | q[:, 1::2]).T}
        rowwise = d_in % cfg.block_size == 0

        def layout(maxima: np.ndarray) -> np.ndarray:
            return maxima.reshape(d_out, -1).T if rowwise else maxima

        if cfg.double_quant:
            offset = np.float32(absmax.astype(np.float64).mean())
            q_absmax, absmax_scale = double_quantize(absmax, offset)
            out.update(absmax=layout(q_absmax), absmax_scale=absmax_scale,
                       absmax_offset=np.asarray(offset, np.float32))
        else:
            out["absmax"] = layout(absmax)
        return out


class Int8Weight(nnx.Module):
    """A kernel [*layers, in, out] in int8 with one float32 absmax per output channel."""

    INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127 in its dequantize

    def __init__(self, shape: tuple[int, ...], axes: tuple, dtype, cfg: QuantConfig):
        *lead, d_in, d_out = shape
        self.shape, self.axes, self.dtype = tuple(shape), tuple(axes), jnp.dtype(dtype)
        self.values = Quantized(jnp.zeros(shape, jnp.int8), axes=tuple(axes))
        self.absmax = Quantized(jnp.zeros((*lead, d_out), jnp.float32),
                                axes=(*axes[:-2], axes[-1]))

    def dequantize(self, dtype=None) -> jax.Array:
        dense = (self.values[...].astype(jnp.float32) * self.absmax[...][..., None, :]
                 * self.INV_127)
        return dense.astype(dtype or self.dtype)

    @staticmethod
    def encode(kernel: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
        w = kernel.astype(np.float32)
        absmax = np.abs(w).max(axis=0)
        scale = np.float32(127.0) / np.where(absmax > 0, absmax, np.float32(1.0))
        return {"values": np.round(w * scale[None, :]).astype(np.int8), "absmax": absmax}


# MXFP4's sixteen E2M1 values, indexed by the 4-bit code (sign bit highest), as transformers
# lists them (`integrations.mxfp4.FP4_VALUES`), and the bias of its power-of-two scales.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
# E2M1's magnitudes in code order, and the midpoints that round a magnitude to the nearest.
_FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2


class MXFP4Weight(nnx.Module):
    """A kernel [*lead, in, out] in MXFP4: `codes` [.., in/2, out], two E2M1 values a byte (the
    lower input in the low nibble, as gpt-oss's `_blocks` hold them), and `scales` [.., in/32,
    out], one exponent (bias 127) per 32 inputs of an output."""

    BLOCK = 32

    def __init__(self, shape: tuple[int, ...], axes: tuple, dtype, cfg: QuantConfig):
        *lead, d_in, d_out = shape
        self.shape, self.axes, self.dtype = tuple(shape), tuple(axes), jnp.dtype(dtype)
        self.codes = Quantized(jnp.zeros((*lead, d_in // 2, d_out), jnp.uint8), axes=tuple(axes))
        self.scales = Quantized(jnp.zeros((*lead, d_in // self.BLOCK, d_out), jnp.uint8),
                                axes=tuple(axes))

    def dequantize(self, dtype=None) -> jax.Array:
        """code value · 2^(scale − 127), exact in float32 (the scale built from its bits), as
        transformers' `_convert_moe_packed_tensors` computes it."""
        dtype = jnp.dtype(dtype or self.dtype)
        # A code times a power of two is exact in any dtype with float32's exponent range, so
        # bfloat16 weights are computed in bfloat16 (half the temporary of float32's).
        exact = dtype if dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) \
            else jnp.dtype(jnp.float32)
        codes = self.codes[...]
        *lead, half, d_out = codes.shape
        table = jnp.asarray(FP4_VALUES, exact)
        pairs = jnp.stack([table[codes & 0xF], table[codes >> 4]], axis=-2)  # [.., in/2, 2, out]
        values = pairs.reshape(*lead, 2 * half // self.BLOCK, self.BLOCK, d_out)
        exponent = self.scales[...].astype(jnp.int32) - SCALE_BIAS
        power = jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)  # 2^exponent
        dense = values * power.astype(exact)[..., None, :]
        return dense.reshape(*lead, 2 * half, d_out).astype(dtype)

    @staticmethod
    def encode(kernel: np.ndarray, cfg: QuantConfig) -> dict[str, np.ndarray]:
        """One kernel [in, out] -> codes and scales. Each block's scale puts its largest
        magnitude in [4, 8), so a block that was MXFP4 (every value a code times its scale)
        packs back into the same values; other weights round to the nearest code."""
        d_in, d_out = kernel.shape
        w = kernel.astype(np.float32).reshape(d_in // MXFP4Weight.BLOCK, MXFP4Weight.BLOCK,
                                              d_out)
        _, top = np.frexp(np.abs(w).max(axis=1))  # largest = m·2^top, m in [0.5, 1)
        biased = np.clip(top.astype(np.int32) - 3 + SCALE_BIAS, 1, 254)  # zero blocks: any
        scaled = np.ldexp(w, -(biased - SCALE_BIAS)[:, None, :])
        codes = np.searchsorted(_FP4_MIDPOINTS, np.abs(scaled)).astype(np.uint8)
        codes |= np.signbit(scaled).astype(np.uint8) << 3
        codes = codes.reshape(d_in // 2, 2, d_out)
        return {"codes": codes[:, 0] | (codes[:, 1] << 4), "scales": biased.astype(np.uint8)}


WEIGHTS: dict[str, type] = {NF4: NF4Weight, INT8: Int8Weight, MXFP4: MXFP4Weight}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """How one kernel of the checkpoint becomes packed arrays as it is read: the loader hands
    each layer's [in, out] slice (already in the parameter dtype) to `encode`."""

    shape: tuple[int, ...]  # the logical kernel, layers included
    dtype: np.dtype  # the parameter dtype: a bfloat16 run quantizes bfloat16-rounded weights
    encode: Callable[[np.ndarray], dict[str, np.ndarray]]


def _quantizable(model: nnx.Module, cfg: QuantConfig) -> Iterator[tuple[str, Linear]]:
    """The projections a quantized base packs: every dense `Linear` but the output head, which
    bitsandbytes leaves in its dtype (transformers' `get_keys_to_not_convert`); a width NF4
    cannot pack is refused, never left dense in silence."""
    for path, linear in list(linear_modules(model)):
        if linear.packed or is_output_head(path):
            continue
        if not cfg.quantizable(linear.kernel_shape[-2]):
            raise JaxftError(f"lora.base_quant {cfg.kind}: {path} has {linear.kernel_shape[-2]} "
                             "inputs, an odd number, and NF4 packs two weights of a row into "
                             "each byte; use lora.base_quant=int8 for this model")
        yield path, linear


def _quantizable_experts(model: nnx.Module, cfg: QuantConfig
                         ) -> Iterator[tuple[str, experts_lib.Experts, str]]:
    """(path, module, weight name) of every expert weight a quantized base packs: all of them,
    in any kind; a width the kind cannot block is refused in one line."""
    block = {NF4: cfg.block_size, MXFP4: MXFP4Weight.BLOCK, INT8: 1}[cfg.kind]
    for path, module in list(experts_lib.expert_modules(model)):
        for name in experts_lib.PARAMETERS:
            if module.packed(name):
                continue
            d_in = module.weight_shape(name)[-2]
            if d_in % block:
                raise JaxftError(f"lora.base_quant {cfg.kind}: {path}.{name} has {d_in} inputs, "
                                 f"not a multiple of the {block} weights a block holds")
            yield path, module, name


def _expert_config(cfg: QuantConfig) -> QuantConfig:
    """The settings experts are packed with: NF4 in whole-row blocks, without double
    quantization (see the module's docstring)."""
    return dataclasses.replace(cfg, double_quant=False)


def _each_expert(encode: Callable[[np.ndarray], dict[str, np.ndarray]]
                 ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """`encode` for an expert weight as the checkpoint gives it: one expert's [in, out] (or a
    piece of it), or a layer's [E, in, out], one expert at a time."""
    def run(kernel: np.ndarray) -> dict[str, np.ndarray]:
        if kernel.ndim == 2:
            return encode(kernel)
        parts = [encode(k) for k in kernel]
        return {name: np.stack([p[name] for p in parts]) for name in parts[0]}

    return run


def quantize_kernels(model: nnx.Module, cfg: QuantConfig) -> dict[str, Encoder]:
    """Swap the kernels of `model` for packed ones (zero-filled), in place, and return the
    encoders that fill them from a checkpoint, by kernel path. Meant for the model `build`
    makes under `nnx.eval_shape`, so no kernel is ever allocated in its float dtype."""
    encoders = {}
    weight_cls = WEIGHTS[cfg.kind]
    if cfg.kind != MXFP4:
        for path, linear in _quantizable(model, cfg):
            shape, dtype = linear.kernel_shape, linear.kernel_dtype
            linear.kernel = weight_cls(shape, linear.kernel_axes, dtype, cfg)
            encoders[path + ".kernel"] = Encoder(shape, np.dtype(dtype),
                                                 lambda w, c=weight_cls: c.encode(w, cfg))
    expert_cfg = _expert_config(cfg)
    for path, module, name in _quantizable_experts(model, cfg):
        shape, dtype = module.weight_shape(name), module.weight_dtype(name)
        module.set_weight(name, weight_cls(shape, module.weight_axes(name), dtype, expert_cfg))
        encoders[f"{path}.{name}"] = Encoder(shape, np.dtype(dtype), _each_expert(
            lambda w, c=weight_cls: c.encode(w, expert_cfg)))
    if cfg.kind == MXFP4 and not encoders:
        raise JaxftError("lora.base_quant mxfp4 packs a mixture of experts' expert weights, and "
                         f"this {model.config.model_type} model has none (nf4 or int8 pack "
                         "its projections)")
    return encoders


def _packed_in_memory(value: jax.Array, weight_cls: type, shape: tuple[int, ...], axes: tuple,
                      dtype, cfg: QuantConfig, layer_ndim: int) -> nnx.Module:
    """A packed module holding `value` (a weight on the devices), encoded on the host one
    layer at a time and put back on the devices, sharded as the weight was."""
    from jaxft import sharding
    from jaxft.models.params import to_host

    weight = nnx.eval_shape(lambda: weight_cls(shape, axes, dtype, cfg))
    encode = _each_expert(lambda w: weight_cls.encode(w, cfg))
    host = to_host(value)
    stacked = host.ndim > layer_ndim
    layers = [encode(w) for w in (host if stacked else [host])]
    mesh = value.sharding.mesh if isinstance(value.sharding, jax.sharding.NamedSharding) \
        else None
    for name, var in nnx.to_flat_state(nnx.state(weight)):
        array = np.stack([p[name[0]] for p in layers]) if stacked else layers[0][name[0]]
        placed = (sharding.put(array, sharding.variable_sharding(var, mesh)) if mesh
                  else jnp.asarray(array))
        getattr(weight, name[0]).set_value(placed)
    return weight


def quantize_model(model: nnx.Module, cfg: QuantConfig) -> nnx.Module:
    """Quantize an in-memory model's projections (and experts) in place, as
    `jaxft.hf.weights.load_hf_model` does while it reads a checkpoint: for a model built or
    changed in Python. Each kernel passes through the host one at a time, and its packed arrays
    go back where it lived."""
    cfg.check()
    weight_cls = WEIGHTS[cfg.kind]
    if cfg.kind != MXFP4:
        for _, linear in _quantizable(model, cfg):
            linear.kernel = _packed_in_memory(linear.kernel[...], weight_cls, linear.kernel_shape,
                                              linear.kernel_axes, linear.kernel_dtype, cfg, 2)
    expert_cfg = _expert_config(cfg)
    for _, module, name in _quantizable_experts(model, cfg):
        module.set_weight(name, _packed_in_memory(
            module.weight_value(name), weight_cls, module.weight_shape(name),
            module.weight_axes(name), module.weight_dtype(name), expert_cfg, 3))
    return model


def _packed(model: nnx.Module) -> Iterator[Linear]:
    return (linear for _, linear in linear_modules(model) if linear.packed)


def _packed_experts(model: nnx.Module) -> Iterator[tuple[experts_lib.Experts, str]]:
    return ((module, name) for _, module in experts_lib.expert_modules(model)
            for name in experts_lib.PARAMETERS if module.packed(name))


def dequantize_model(model: nnx.Module) -> nnx.Module:
    """Every packed kernel (and expert weight) back to a dense parameter of its dtype, in place
    (before merging adapters into the base and exporting it)."""
    for linear in list(_packed(model)):
        linear.kernel = nnx.Param(linear.kernel.dequantize(), axes=linear.kernel_axes)
    for module, name in list(_packed_experts(model)):
        packed = module.weight(name)
        module.set_weight(name, nnx.Param(packed.dequantize(), axes=packed.axes))
    return model


def packed_size(model: nnx.Module) -> tuple[int, int]:
    """(bytes, parameters) of the packed kernels and expert weights, codes and scales: what the
    quantized weights cost, and how many weights they stand for."""
    packed = [linear.kernel for linear in _packed(model)]
    packed += [module.weight(name) for module, name in _packed_experts(model)]
    total_bytes = total_params = 0
    for weight in packed:
        arrays = jax.tree.leaves(nnx.state(weight))
        total_bytes += sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)
        total_params += math.prod(weight.shape)
    return total_bytes, total_params
