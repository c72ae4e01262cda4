"""Model families, chosen from a Hugging Face config's `model_type`.

A family module provides what `jaxft.models.family.Family` lists (`Config` with `from_hf`,
`Model`, `HF_TENSORS`, `MODEL_TYPES`); its config what `ModelConfig` lists.
"""

from __future__ import annotations

from jaxft.errors import JaxftError
from jaxft.models import bert, gemma, gpt2, gpt_oss, llama, mixtral, qwen3_moe
from jaxft.models.family import CausalLM, Family, ModelConfig
from jaxft.models.params import TensorMapping

FAMILIES: tuple[Family, ...] = (llama, qwen3_moe, mixtral, gpt_oss, gemma, gpt2, bert)

__all__ = ["FAMILIES", "CausalLM", "Family", "ModelConfig", "family_for", "tensor_table"]


def tensor_table(cfg: ModelConfig) -> TensorMapping:
    """The Hugging Face <-> jaxft name table of a model's family, with its layers placed as
    this config places them (a mixture of experts may keep dense layers in a stack of their
    own: `moe.Config.placement`)."""
    table = family_for({"model_type": cfg.model_type}).HF_TENSORS
    return table.placed(cfg.placement) if cfg.routes_tokens else table


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """The family module that implements this Hugging Face config."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.MODEL_TYPES)
    what = UNSUPPORTED_VARIANTS.get(model_type)
    raise JaxftError(
        f"{source}: model_type {model_type!r} "
        + (f"is {what}, which jaxft does not load" if what else "is not supported")
        + f" (supported: {supported})"
    )


# Checkpoints users reach for that are close to a supported family but not one of its models:
# what each is, so the refusal says why.
UNSUPPORTED_VARIANTS = {
    "gemma3": "a multimodal Gemma 3 (vision tower and text model; load a text-only "
              "gemma3_text checkpoint such as google/gemma-3-1b-it)",
    "gemma3n": "Gemma 3n, a different architecture from Gemma 3's text models",
    "qwen2_moe": "a mixture-of-experts Qwen2 (jaxft loads the dense qwen2 models)",
    "phimoe": "a mixture-of-experts Phi-3.5 (jaxft loads the dense phi3 models)",
    "phi3small": "Phi-3-small, whose attention differs from Phi-3-mini's (jaxft loads phi3)",
    "qwen2_vl": "a vision-language Qwen2 (jaxft loads the text-only qwen2 models)",
}
