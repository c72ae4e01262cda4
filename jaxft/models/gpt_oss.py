"""gpt-oss (`GptOssForCausalLM`): LLaMA-style attention with biases and sinks, every other
layer windowed, and a biased router and biased experts with a clamped SwiGLU.

The model is `moe.Model`; what is gpt-oss's own is its tensor names, which transformers both
holds and saves fused and in [in, out] order (`mlp.experts.gate_up_proj` [E, D, 2F], its gate
and up columns alternating, which jaxft keeps), so the table is renames only. OpenAI's released
checkpoints hold the expert weights in MXFP4 (`gate_up_proj_blocks` and `_scales`); the reader
(`jaxft.hf.mxfp4`) dequantizes them into these names as transformers does.
"""

from __future__ import annotations

from jaxft.models import llama, moe
from jaxft.models.params import IDENTITY, TRANSPOSE, TensorMapping

MODEL_TYPES = ("gpt_oss",)
Config = moe.Config
Model = moe.Model

_MLP = "model.layers.mlp"
HF_TENSORS = TensorMapping(
    (
        *(entry for entry in llama.HF_TENSORS.entries if ".mlp." not in entry[0]),
        ("model.layers.{L}.self_attn.sinks", "model.layers.self_attn.sinks", IDENTITY),
        ("model.layers.{L}.mlp.router.weight", f"{_MLP}.router.kernel", TRANSPOSE),
        ("model.layers.{L}.mlp.router.bias", f"{_MLP}.router.bias", IDENTITY),
        *((f"model.layers.{{L}}.mlp.experts.{name}", f"{_MLP}.experts.{name}", IDENTITY)
          for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    ),
    ignored=llama.HF_TENSORS_IGNORED,
    tied_head=llama.HF_TENSORS.tied_head,
)
