"""FLOPs of a training step, counted from the model's matmuls: the one FLOPs model of the dry
run, `--suggest`'s ranking and the benchmark's MFU.

A forward pass costs 2 FLOPs per weight per token; the backward pass costs 2 more for the
activation gradients and, only for weights that train, 2 more for the weight gradients:
6N·tokens in full fine-tuning, 4N·tokens when the base is frozen (LoRA), plus 6 per adapter
weight. N counts the projection kernels (and a tied embedding, which is the output head), and in a
mixture of experts the routers and the k experts each token is sent to, not all E; embedding
lookups cost nothing. Attention scores and values add 4·T·width per token and layer
forward, 3× that for a training step (causal masking is not subtracted: the kernels compute the
masked scores too). Remat's recomputation comes on top (`recompute_flops`).
`tests/test_benchmark.py` holds the count to PyTorch's own FLOP counter on the same model.
"""

from __future__ import annotations

import math

from flax import nnx

from jaxft import lora
from jaxft.models.layers import linear_modules
from jaxft.spec import RunSpec


def step_flops(model: nnx.Module, run: RunSpec, remat: str | None = None) -> tuple[float, float]:
    """(the step's FLOPs, what remat recomputes on top) on all devices, for `model` (real or
    abstract, adapters attached) trained as `run` says (`remat`: another policy than the
    run's). A DPO step scores both halves of each pair, and under LoRA or with a frozen copy
    also runs the reference's forward."""
    tokens = run.train.batch_size * run.config.data.max_len * run.sequences_per_row
    seq_len = run.config.data.max_len
    return (analytic_flops(model, tokens, seq_len, full=run.full, reference=run.step_reference),
            recompute_flops(model, tokens, seq_len, remat or run.train.remat))


def analytic_flops(model: nnx.Module, tokens: int, seq_len: int, *, full: bool,
                   reference: bool = False) -> float:
    """FLOPs of one step of `tokens` tokens (rows of `seq_len`) on all devices, remat aside
    (see the module docstring). `reference`: the step also runs the frozen base's forward
    (DPO's reference)."""
    matmul, adapters, attention = _forward_terms(model, seq_len)
    extra = 2 * matmul + attention if reference else 0
    return float(tokens * ((6 if full else 4) * matmul + 6 * adapters + 3 * attention + extra))


def recompute_flops(model: nnx.Module, tokens: int, seq_len: int, remat: str) -> float:
    """What remat adds to a step: `full` runs each layer's forward again in the backward pass
    (the output head and loss are outside the layers and are not rerun); `dots_saveable` keeps
    the projections' outputs and reruns only the rest, of which attention is the part that
    counts; `none` reruns nothing."""
    if remat == "none":
        return 0.0
    matmul, adapters, attention = _forward_terms(model, seq_len, layers_only=True)
    per_token = attention if remat == "dots_saveable" else 2 * (matmul + adapters) + attention
    return float(tokens * per_token)


def _forward_terms(model: nnx.Module, seq_len: int,
                   layers_only: bool = False) -> tuple[int, int, int]:
    """Per token: the base matmul weights N, the adapter weights, and attention's forward
    FLOPs (4·T·width per layer)."""
    cfg = model.config
    linears = [linear for _, linear in linear_modules(model)
               if not layers_only or _stacked(linear)]
    matmul = sum(math.prod(linear.kernel_shape) for linear in linears)
    adapters = sum(lora.count_parameters(nnx.state(linear, nnx.LoRAParam)) for linear in linears)
    if cfg.tie_word_embeddings and not layers_only:
        matmul += cfg.vocab_size * cfg.hidden_size
    if cfg.routes_tokens:  # the routers and experts live in the layers, outside linear_modules
        matmul += cfg.routed_params_per_token
        on_experts = sum(lora.count_parameters(nnx.state(adapter, nnx.LoRAParam))
                         for adapter in lora.expert_adapters(model).values())
        adapters += on_experts * cfg.num_experts_per_tok // cfg.num_experts
        adapters += sum(lora.count_parameters(nnx.state(adapter, nnx.LoRAParam))
                        for adapter in lora.router_adapters(model).values())
    width = cfg.head_dim * cfg.num_attention_heads
    return matmul, adapters, 4 * seq_len * width * cfg.num_hidden_layers


def _stacked(linear: nnx.Module) -> bool:
    """A projection inside the scanned layers: its kernel carries the leading `layers` axis."""
    return linear.kernel_axes[:1] == ("layers",)
