"""gpt-oss's released expert weights in MXFP4, dequantized as they stream in.

OpenAI ships gpt-oss with each expert weight as two tensors: `<name>_blocks` [E, rows, G, 16]
(uint8, two 4-bit E2M1 values a byte: the low nibble first) and `<name>_scales` [E, rows, G]
(uint8 exponents biased by 127), one scale per block of 32 values. transformers'
`_convert_moe_packed_tensors` turns them into the model's weight: each nibble through the FP4
table, times 2^(scale - 127), the blocks laid end to end along the rows' inputs, then the last
two axes swapped, giving gpt-oss's [E, in, out] layout. This does the same, one expert at a
time so host memory holds one expert's float copy beyond the checkpoint's, and hands the
result on under `<name>`, the name a dequantized checkpoint (and export) uses. Every value is a
4-bit float times a power of two, so bfloat16 (what transformers produces) holds it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np

from jaxft.errors import JaxftError
from jaxft.quant import FP4_VALUES, SCALE_BIAS

BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray, source: str = "checkpoint") -> np.ndarray:
    """[E, rows, G, 16] packed codes and [E, rows, G] exponents -> [E, G·32, rows] bfloat16."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise JaxftError(f"{source}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} "
                         f"and {scales.dtype}")
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise JaxftError(f"{source}: MXFP4 blocks {tuple(blocks.shape)} and scales "
                         f"{tuple(scales.shape)} do not fit (expected [E, rows, G, 16] and "
                         "[E, rows, G])")
    table = np.asarray(FP4_VALUES, np.float32)
    experts, rows, groups, _ = blocks.shape
    out = np.empty((experts, groups * 32, rows), ml_dtypes.bfloat16)
    for e in range(experts):
        codes = blocks[e]
        values = np.stack([table[codes & 0x0F], table[codes >> 4]], axis=-1)  # low nibble first
        values = np.ldexp(values.reshape(rows, groups, 32),
                          scales[e].astype(np.int32)[..., None] - SCALE_BIAS)
        out[e] = values.reshape(rows, groups * 32).T.astype(ml_dtypes.bfloat16)
    return out


def dequantized(tensors: Iterator[tuple[str, np.ndarray]], source: str
                ) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of a checkpoint with each MXFP4 pair (`<name>_blocks`, `<name>_scales`)
    replaced by `<name>`, dequantized; every other tensor passes through. A pair's first half
    waits for the second (they sit side by side in gpt-oss's files); one left without its
    partner at the end is named."""
    waiting: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in tensors:
        suffix = next((s for s in (BLOCKS, SCALES) if name.endswith(s)), None)
        if suffix is None:
            yield name, array
            continue
        base = name[: -len(suffix)]
        if base not in waiting:
            waiting[base] = (suffix, array)
            continue
        first_suffix, first = waiting.pop(base)
        if first_suffix == suffix:
            raise JaxftError(f"{source}: tensor {name} appears twice")
        blocks, scales = (first, array) if first_suffix == BLOCKS else (array, first)
        yield base, dequantize(blocks, scales, f"{source}: {base}")
    for base, (suffix, _) in waiting.items():
        other = SCALES if suffix == BLOCKS else BLOCKS
        raise JaxftError(f"{source}: MXFP4 tensor {base}{suffix} has no {base}{other} (each "
                         "quantized weight needs both its blocks and its scales)")
