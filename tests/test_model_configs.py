"""A config.json with a field left out builds the model transformers builds from it, and one with
sizes that do not fit together is refused in one line naming the field, for every family."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import jaxft
from tests import hf_models
from tests.tiny_run import REPO, subprocess_env, write_config_file

# Keys that say nothing about the model's computation, or that transformers needs to find the
# class and weights at all.
NOT_MODEL = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
             "_name_or_path", "use_cache", "output_attentions", "output_hidden_states",
             "return_dict", "pad_token_id", "bos_token_id", "eos_token_id", "attn_implementation",
             "_attn_implementation_autoset", "id2label", "label2id", "tie_encoder_decoder",
             "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "problem_type",
             "classifier_dropout", "gradient_checkpointing"}
FAMILIES = sorted(hf_models.CAUSAL_CONFIGS) + ["bert"]


def saved(name: str, tmp_path):
    """A tiny model of the family, saved (config.json holds the fields off transformers'
    defaults, as save_pretrained writes it), and its config as a dict."""
    if name == "bert":
        hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    else:
        hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path / "full")
    return json.loads((tmp_path / "full" / "config.json").read_text())


def outputs(model_dir, name: str, ids, mask):
    """transformers' logits (hidden states for BERT) of the checkpoint in `model_dir`, or why
    transformers cannot build that model from these weights: its config class refuses, or a
    default gives a shape the weights do not have (which transformers 5 "reinitialises" at
    random, with a load report, rather than refuse)."""
    cls = transformers.BertModel if name == "bert" else transformers.AutoModelForCausalLM
    try:
        model, info = cls.from_pretrained(
            model_dir, dtype=torch.float32, output_loading_info=True,
            **({} if name == "bert" else {"attn_implementation": "eager"}))
    except Exception as e:  # noqa: BLE001  (its config classes raise several kinds)
        return f"{type(e).__name__}: {e}"
    if info["mismatched_keys"] or info["missing_keys"]:
        return f"weights do not fit: {sorted(info['mismatched_keys'] or info['missing_keys'])}"
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    except Exception as e:  # noqa: BLE001  (a config its own model cannot run)
        return f"{type(e).__name__}: {e}"
    return (out.last_hidden_state if name == "bert" else out.logits).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_field_left_out_takes_transformers_default(name, tmp_path):
    """Each model field of a family's config.json, removed in turn: jaxft builds the model
    transformers builds from what is left (equal logits), or refuses in one line where
    transformers cannot build it either."""
    import shutil

    config = saved(name, tmp_path)
    ids, mask = hf_models.padded_batch(seed=5, batch=2, length=12)
    fields = sorted(set(config) - NOT_MODEL)
    assert fields, config
    compared = 0
    for field in fields:
        variant = tmp_path / field
        shutil.copytree(tmp_path / "full", variant)
        (variant / "config.json").write_text(json.dumps(
            {k: v for k, v in config.items() if k != field}))
        want = outputs(variant, name, ids, mask)
        if isinstance(want, str):  # transformers refuses: so must jaxft, in one line
            with pytest.raises(jaxft.JaxftError):
                jaxft.from_pretrained(variant)
            continue
        try:
            model = jaxft.from_pretrained(variant)
        except jaxft.JaxftError as e:
            # An untied checkpoint whose config no longer says so: transformers ties the head
            # to the embedding and loads one over the other; jaxft refuses the contradiction.
            assert field == "tie_word_embeddings" and "ties the output head" in str(e), e
            continue
        got = np.asarray(model(ids, mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name} without {field}")
        compared += 1
    assert compared >= 3, (name, fields)


def write_config(tmp_path, hf: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8}
GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
          "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16}


@pytest.mark.parametrize("base, change, message", [
    (MISTRAL, {"sliding_window": 0}, r"sliding_window must be a positive number of tokens or "
                                     r"null \(no window\), got 0"),
    (MISTRAL, {"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of "
                                          r"num_key_value_heads \(3\)"),
    (MISTRAL, {"vocab_size": -5}, "vocab_size must be a positive whole number, got -5"),
    (MISTRAL, {"head_dim": 15}, "head_dim must be even"),
    (MISTRAL, {"hidden_size": 66}, r"hidden_size \(66\) must be a multiple of "
                                   r"num_attention_heads \(4\)"),
    (GEMMA3, {"sliding_window_pattern": 0}, "sliding_window_pattern must be a positive whole "
                                            "number, got 0"),
    (GEMMA3, {"layer_types": ["full_attention"] * 5}, r"layer_types has 5 entries for 3 "
                                                      r"layers \(num_hidden_layers\)"),
    (GEMMA3, {"layer_types": ["full_attention", "chunked", "full_attention"]},
     "layer_types must be a list of full_attention / sliding_attention"),
])
def test_sizes_that_do_not_fit_together_are_one_line(base, change, message, tmp_path):
    model_dir = write_config(tmp_path / "model", {**base, **change})
    with pytest.raises(jaxft.JaxftError, match=rf"^{re.escape(str(model_dir))}/config.json: "
                       + message):
        jaxft.from_pretrained(model_dir)


def test_the_dry_run_refuses_a_bad_config_json_in_one_line(tmp_path):
    model_dir = write_config(tmp_path / "model", {**GEMMA3, "sliding_window_pattern": 0})
    config = write_config_file(tmp_path / "cfg.py", model_dir, tmp_path / "run", **{
        "data.train_path": str(tmp_path / "none.jsonl")})
    done = subprocess.run([sys.executable, "-m", "jaxft.train", f"--config={config}",
                           "--dry_run"], cwd=REPO, env=subprocess_env(1), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {model_dir}/config.json: sliding_window_pattern must be a positive whole "
        "number, got 0")


def test_gemma2_without_query_pre_attn_scalar_scales_as_transformers_does(tmp_path):
    """The case that showed it: transformers' Gemma2Config defaults query_pre_attn_scalar to
    256, not to the head dim jaxft used to fall back to."""
    config = saved("gemma2_softcap_window", tmp_path)
    (tmp_path / "full" / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "query_pre_attn_scalar"}))
    ids, mask = hf_models.padded_batch(seed=2, batch=2, length=12)
    want = outputs(tmp_path / "full", "gemma2_softcap_window", ids, mask)
    got = np.asarray(jaxft.from_pretrained(tmp_path / "full")(ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
