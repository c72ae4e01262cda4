"""YaRN's inverse frequencies and attention factor against transformers' own computation
(`ROPE_INIT_FUNCTIONS["yarn"]`), over the options its configs use; the per-family logits tests
run it through a model (`hf_models`' Qwen3-MoE)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxft.models import rope


@pytest.mark.parametrize("parameters", [
    {"factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen3's long context
    {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
     "beta_slow": 1.0, "truncate": False},  # gpt-oss
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    {"factor": 8.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3},
])
def test_yarn_frequencies_are_transformers(parameters):
    config = transformers.Qwen3Config(
        head_dim=64, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **parameters})
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    got, factor = rope.yarn_frequencies(64, 150000.0, parameters)
    # numpy's float32 power and torch's round θ^(2i/d) differently in the last bit for a few
    # i (the default RoPE shares those powers): one ulp is allowed, nothing more.
    np.testing.assert_allclose(got, want.numpy(), rtol=1.2e-7, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)
