"""What a model family provides, written down: the checklist for adding one.

A family is a module (`llama.py`, `gpt2.py`, `bert.py`) with four names (`Family`): its config
dataclass, its model, its one tensor table, and the Hugging Face `model_type`s it serves. The
rest of jaxft reads a model only through these and through the attributes below, never by
probing with `getattr`; `tests/test_models.py` checks every family against them.
docs/adding_a_model.md walks through writing one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from jaxft.models.params import TensorMapping


@runtime_checkable
class ModelConfig(Protocol):
    """A family's `Config`: sizes read from `config.json`, plus the run-time options jaxft sets
    (`dtype`, `remat`, `attention`) with `dataclasses.replace`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # = num_attention_heads without grouped-query attention
    head_dim: int
    position_limit: int | None  # positions a learned table holds; None (RoPE): no limit
    tie_word_embeddings: bool  # the output head is the token embedding
    has_base_prefix: bool  # exported tensor names keep HF's base-model prefix (`model.`)
    num_labels: int | None  # a sequence classifier's classes; None for other models
    # A mixture of experts: its call takes `return_router`, and its config also has
    # `aux_loss_coef`, `expert_params` and `routed_params_per_token` (`jaxft.models.moe`).
    routes_tokens: bool
    dtype: str | None  # compute dtype; None computes in the parameter dtype
    remat: str
    attention: str

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> ModelConfig:
        """From a Hugging Face config dict; a `JaxftError` names what it cannot take."""

    def to_hf(self) -> dict:
        """The Hugging Face config dict to export with the weights."""

    def may_be_missing(self, path: str) -> bool:
        """Whether a parameter may be absent from the checkpoint (a new task head), to be
        initialised as `Model.__init__` does."""


@runtime_checkable
class CausalLM(Protocol):
    """A decoder: what the LM loss, generation and the KV cache call."""

    config: ModelConfig

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: Any = None, return_hidden: bool = False) -> Any:
        """Logits [B, T, V] (or the final hidden states [B, T, D] with `return_hidden`); with
        a `cache`, `(logits, cache)`."""

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head on final hidden states [B, T, D] -> [B, T, V] (generation applies
        it to the last position only)."""

    def output_head(self) -> jax.Array | None:
        """The head as one [D, V] matrix in the compute dtype, so the loss can fuse it with the
        cross-entropy; None when it is more than a matmul (an adapter on it)."""


@runtime_checkable
class Family(Protocol):
    """A family module: `Config`, `Model(config, *, rngs, param_dtype)`, its tensor table read
    both ways, and the `model_type`s of the Hugging Face configs it loads."""

    Config: type
    Model: type
    HF_TENSORS: TensorMapping
    MODEL_TYPES: tuple[str, ...]
