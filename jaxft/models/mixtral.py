"""Mixtral (`MixtralForCausalLM`): Mistral's attention (and sliding window, when set), with a
router and eight experts for an MLP whose top-2 weights are always renormalised.

The model is `moe.Model`; what is Mixtral's own is its tensor names. Released checkpoints, and
transformers' `save_pretrained`, hold `block_sparse_moe.experts.{E}.w1/w3/w2` (gate, up,
down) and `block_sparse_moe.gate`; export writes those. transformers 5's in-memory names
(`mlp.gate`, the fused `mlp.experts.gate_up_proj` and `down_proj`) are what jaxft's modules,
LoRA targets and PEFT names follow, and a checkpoint saved with them loads too.
"""

from __future__ import annotations

from jaxft.models import llama, moe
from jaxft.models.params import SWAP_LAST, TRANSPOSE, Part, TensorMapping

MODEL_TYPES = ("mixtral",)
Config = moe.Config
Model = moe.Model

_EXPERTS = "model.layers.mlp.experts"
_SAVED = "model.layers.{L}.block_sparse_moe"
HF_TENSORS = TensorMapping(
    (
        *(entry for entry in llama.HF_TENSORS.entries if ".mlp." not in entry[0]),
        (f"{_SAVED}.gate.weight", "model.layers.mlp.gate.kernel", TRANSPOSE),
        (f"{_SAVED}.experts.{{E}}.w1.weight", f"{_EXPERTS}.gate_up_proj", TRANSPOSE,
         Part(0, 2)),
        (f"{_SAVED}.experts.{{E}}.w3.weight", f"{_EXPERTS}.gate_up_proj", TRANSPOSE,
         Part(1, 2)),
        (f"{_SAVED}.experts.{{E}}.w2.weight", f"{_EXPERTS}.down_proj", TRANSPOSE),
    ),
    aliases=(
        ("model.layers.{L}.mlp.gate.weight", "model.layers.mlp.gate.kernel", TRANSPOSE),
        ("model.layers.{L}.mlp.experts.gate_up_proj", f"{_EXPERTS}.gate_up_proj", SWAP_LAST),
        ("model.layers.{L}.mlp.experts.down_proj", f"{_EXPERTS}.down_proj", SWAP_LAST),
    ),
    ignored=llama.HF_TENSORS_IGNORED,
    tied_head=llama.HF_TENSORS.tied_head,
)
