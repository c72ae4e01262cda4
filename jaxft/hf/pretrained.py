"""`jaxft.from_pretrained`: a Hugging Face checkpoint, plus a PEFT adapter on top if one is named.

Weight conversion (`jaxft.hf.weights`) knows nothing of LoRA and the adapter code
(`jaxft.hf.adapters`) nothing of checkpoint files; this is the one place the two meet, for
users.
"""

from __future__ import annotations

import os

from flax import nnx
from jax.sharding import Mesh

from jaxft import dtypes, quant
from jaxft.dtypes import DTypeLike
from jaxft.hf import adapters, weights
from jaxft.hf.model import ModelOptions


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: DTypeLike = "float32",
    compute_dtype: DTypeLike | None = None,
    num_labels: int | None = None,
    seed: int = 0,
    remat: str = "none",
    attention: str = "auto",
    mesh: Mesh | None = None,
    quantize: str | quant.QuantConfig | None = None,
) -> nnx.Module:
    """Load a checkpoint (directory, hub id or .gguf file) as a jaxft model, in eval mode.

    `adapter` is a PEFT LoRA adapter directory (or hub id), e.g. one trained in PyTorch, to load
    on top for inference or to continue training. `dtype` is the parameter dtype in any
    spelling (`jnp.bfloat16`, `"bfloat16"`, `np.float32`); `compute_dtype` defaults to it.
    `num_labels` turns a BERT encoder into a sequence classifier with a freshly initialised
    head (or checks an existing one); `remat` is the layer rematerialisation policy for
    training, `attention` the attention kernel (`jaxft.models.attention`). With a `mesh` each
    tensor goes straight onto its sharding as it is read. `quantize` stores the frozen
    projections packed: "nf4" (QLoRA, as bitsandbytes), "int8", or a `jaxft.quant.QuantConfig`
    (block size, double quantization).
    """
    if isinstance(quantize, str):
        quantize = quant.QuantConfig(kind=quantize)
    options = ModelOptions(param_dtype=dtypes.canonical(dtype, "dtype"),
                           compute_dtype=compute_dtype, num_labels=num_labels, remat=remat,
                           attention=attention, quantize=quantize, seed=seed)
    model = weights.load_hf_model(path_or_id, options, mesh=mesh)
    if adapter is not None:
        adapters.load_peft_adapter(model, adapter)
        model.eval()  # the adapters' dropout too, as transformers' from_pretrained leaves it
    return model
