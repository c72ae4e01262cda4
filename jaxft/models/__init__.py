"""Model families, chosen from a Hugging Face config's `model_type`.

A family module provides what `jaxft.models.family.Family` lists (`Config` with `from_hf`,
`Model`, `HF_TENSORS`, `MODEL_TYPES`); its config what `ModelConfig` lists.
"""

from __future__ import annotations

from jaxft.errors import JaxftError
from jaxft.models import bert, gpt2, llama
from jaxft.models.family import CausalLM, Family, ModelConfig
from jaxft.models.params import TensorMapping

FAMILIES: tuple[Family, ...] = (llama, gpt2, bert)

__all__ = ["FAMILIES", "CausalLM", "Family", "ModelConfig", "family_for", "tensor_table"]


def tensor_table(model) -> TensorMapping:
    """The Hugging Face <-> jaxft name table of a model's family."""
    return family_for({"model_type": model.config.model_type}).HF_TENSORS


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """The family module that implements this Hugging Face config."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.MODEL_TYPES)
    raise JaxftError(
        f"{source}: model_type {model_type!r} is not supported (supported: {supported})"
    )
