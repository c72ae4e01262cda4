"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention, with a router and experts for an MLP.

The model is `moe.Model`; what is Qwen's own is its tensor names. Checkpoints on the Hub hold
one tensor per expert (`mlp.experts.{E}.gate_proj.weight`, …), which is also what
transformers writes and what export writes; transformers 5 fuses them in memory
(`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]), and a checkpoint
saved in that form loads too. Layers that keep a dense MLP name it as Qwen3 does.
"""

from __future__ import annotations

from jaxft.models import llama, moe
from jaxft.models.params import SWAP_LAST, TRANSPOSE, Part, TensorMapping

MODEL_TYPES = ("qwen3_moe",)
Config = moe.Config
Model = moe.Model

_EXPERTS = "model.layers.mlp.experts"
HF_TENSORS = TensorMapping(
    (
        # LLaMA's attention and norms, and its MLP for the layers that keep a dense one
        # (mlp_only_layers, decoder_sparse_step), which `moe.Config.placement` puts in a stack
        # of their own
        *(entry for entry in llama.HF_TENSORS.entries if ".mlp.gate_up_proj." not in entry[0]),
        ("model.layers.{L}.mlp.gate.weight", "model.layers.mlp.gate.kernel", TRANSPOSE),
        ("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", f"{_EXPERTS}.gate_up_proj",
         TRANSPOSE, Part(0, 2)),
        ("model.layers.{L}.mlp.experts.{E}.up_proj.weight", f"{_EXPERTS}.gate_up_proj",
         TRANSPOSE, Part(1, 2)),
        ("model.layers.{L}.mlp.experts.{E}.down_proj.weight", f"{_EXPERTS}.down_proj",
         TRANSPOSE),
    ),
    aliases=(
        ("model.layers.{L}.mlp.experts.gate_up_proj", f"{_EXPERTS}.gate_up_proj", SWAP_LAST),
        ("model.layers.{L}.mlp.experts.down_proj", f"{_EXPERTS}.down_proj", SWAP_LAST),
    ),
    ignored=llama.HF_TENSORS_IGNORED,
    tied_head=llama.HF_TENSORS.tied_head,
)
