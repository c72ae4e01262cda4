"""`save_pretrained` writes directories transformers loads with the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from tests import hf_models
from tests.test_models import torch_logits

CASES = {
    "llama_gqa_untied_llama3_rope": transformers.AutoModelForCausalLM,
    "qwen2_bias_tied": transformers.AutoModelForCausalLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "mistral_gqa": transformers.AutoModelForCausalLM,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_reloads_in_transformers(name, tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in")
    jaxft.save_pretrained(model, tmp_path / "out")
    reloaded = CASES[name].from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask), atol=1e-5, rtol=0
    )
    assert type(reloaded) is type(hf)


def test_bert_classifier_export_reloads(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in", num_labels=4)  # fresh head
    jaxft.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out"
    ).eval()
    assert type(reloaded).__name__ == "BertForSequenceClassification"
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask),
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
        atol=1e-5,
    )


def test_bert_encoder_export_keeps_base_names(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path / "in")
    jaxft.save_pretrained(jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = hf_models.padded_batch()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask), atol=1e-5
    )


def test_bfloat16_export(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["llama"]())
    hf.save_pretrained(tmp_path / "in")
    jaxft.save_pretrained(
        jaxft.from_pretrained(tmp_path / "in"), tmp_path / "out", dtype="bfloat16"
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = hf.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(reloaded.model.embed_tokens.weight, expected)


def test_export_refuses_to_overwrite(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["gpt2"]())
    hf.save_pretrained(tmp_path / "in")
    model = jaxft.from_pretrained(tmp_path / "in")
    with pytest.raises(jaxft.JaxftError, match="exists and is not empty"):
        jaxft.save_pretrained(model, tmp_path / "in")
    jaxft.save_pretrained(model, tmp_path / "in", overwrite=True)
