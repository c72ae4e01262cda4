"""Packed rows from the pipeline: attention never crosses an example, checked through the model."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import data
from tests.tiny_run import DATA, tiny_model_dir


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_qk_norm_mixed_window", "phi3_longrope_window",
                                    "gemma2_softcap_window", "gemma3_local_global_rope"])
def test_packed_row_logits_equal_each_example_alone(family, tmp_path):
    """So a packed batch's loss is the unpacked examples' loss; the newer families' sliding
    windows and per-kind RoPE restart inside each packed example too."""
    overrides = {"num_key_value_heads": 2} if family == "llama" else {}
    model_dir = tiny_model_dir(tmp_path, family, **overrides)
    model = jaxft.from_pretrained(model_dir)
    cfg = data.default_config()
    cfg.train_path = str(DATA / "faq_prompt_completion.jsonl")
    cfg.max_len, cfg.eval_fraction = 128, 0.0
    bundle = data.build_data(cfg, data.load_tokenizer(str(model_dir)), global_batch_size=4,
                             task="lm", process_index=0, process_count=1)
    batch = next(bundle.train)
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))  # the row packing the most examples
    segments = batch["segment_ids"][row]
    assert segments.max() >= 2
    packed = np.asarray(model(jnp.asarray(batch["input_ids"][row:row + 1]),
                              segment_ids=jnp.asarray(batch["segment_ids"][row:row + 1]),
                              positions=jnp.asarray(batch["positions"][row:row + 1])))[0]
    for segment in range(1, segments.max() + 1):
        where = segments == segment
        alone = np.asarray(model(jnp.asarray(batch["input_ids"][row][where][None])))[0]
        np.testing.assert_allclose(packed[where], alone, atol=1e-4)
