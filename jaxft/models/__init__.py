"""Model families, chosen from a Hugging Face config's `model_type` and `architectures`.

A family module exposes `Config` (with `from_hf`), `Model`, `HF_TENSORS` and `MODEL_TYPES`.
"""

from __future__ import annotations

from types import ModuleType

from jaxft.errors import JaxftError
from jaxft.models import bert, gpt2, llama
from jaxft.models.params import TensorMapping

FAMILIES: tuple[ModuleType, ...] = (llama, gpt2, bert)


def tensor_table(model) -> TensorMapping:
    """The Hugging Face <-> jaxft name table of a model's family."""
    return family_for({"model_type": model.config.model_type}).HF_TENSORS


def family_for(hf_config: dict, source: str = "config.json") -> ModuleType:
    """The family module that implements this Hugging Face config."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.MODEL_TYPES)
    raise JaxftError(
        f"{source}: model_type {model_type!r} is not supported (supported: {supported})"
    )
