"""Logit parity with transformers for every family, loaded from save_pretrained directories."""

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxft
from tests import hf_models


def torch_logits(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().numpy()


@pytest.mark.parametrize("name", sorted(hf_models.CAUSAL_CONFIGS))
def test_causal_lm_logits_match_transformers(name, tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids, mask = hf_models.padded_batch()
    expected = torch_logits(hf, ids, mask)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)  # padded positions are not compared: HF leaves them unspecified
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_models.build(hf_models.llama_config(num_key_value_heads=2))
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids, mask = hf_models.padded_batch()
    got = np.asarray(jaxft.from_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], torch_logits(hf, ids, mask)[mask == 1], atol=1e-4)


def test_pytorch_bin_checkpoint_loads_through_weights_only(tmp_path):
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["gpt2"]())
    hf.save_pretrained(tmp_path, safe_serialization=False) if _bin_supported() else _save_bin(
        hf, tmp_path
    )
    assert (tmp_path / "pytorch_model.bin").exists()
    ids, mask = hf_models.padded_batch()
    got = np.asarray(jaxft.from_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], torch_logits(hf, ids, mask)[mask == 1], atol=1e-4)


def _bin_supported() -> bool:
    import inspect

    return (
        "safe_serialization"
        in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    )


def _save_bin(model, path):
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_bert_hidden_states_match(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids, mask = hf_models.padded_batch()
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    expected = torch_logits(hf, ids, mask, token_type_ids=torch.tensor(types))
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # padding included: HF masks keys only


def test_a_base_berts_position_ids_buffer_loads_without_a_warning(tmp_path, caplog):
    """Older encoder checkpoints (all-MiniLM-L6-v2 among them) store the `position_ids` buffer
    under the base model's own names; transformers loads them in silence, and so must jaxft
    (a tensor it does not know is still named)."""
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    tensors["embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    transformers.BertModel.from_pretrained(tmp_path)  # the peer accepts the file
    with caplog.at_level("WARNING"):
        jaxft.from_pretrained(tmp_path)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    tensors["embeddings.unknown"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    with caplog.at_level("WARNING"):
        jaxft.from_pretrained(tmp_path)
    assert "ignored 1 tensors the model does not use: embeddings.unknown" in caplog.text


def test_bert_classifier_logits_match(tmp_path):
    config = hf_models.bert_config(num_labels=5)
    hf = hf_models.build(config, cls=transformers.BertForSequenceClassification)
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids, mask = hf_models.padded_batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, torch_logits(hf, ids, mask), atol=1e-4)


def test_classifier_head_on_encoder_checkpoint_is_initialised(tmp_path):
    hf = hf_models.build(hf_models.bert_config(), cls=transformers.BertModel)
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path, num_labels=3)
    ids, mask = hf_models.padded_batch()
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    # the encoder weights are the checkpoint's
    np.testing.assert_array_equal(
        np.asarray(model.bert.embeddings.word_embeddings.embedding[...]),
        hf.embeddings.word_embeddings.weight.detach().numpy(),
    )
    # transformers' own classifier on the same checkpoint, given jaxft's fresh head, computes
    # the same logits: the head is wired as BertForSequenceClassification wires it
    torch_cls = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3).eval()
    with torch.no_grad():
        for module, jax_module in ((torch_cls.bert.pooler.dense, model.bert.pooler.dense),
                                   (torch_cls.classifier, model.classifier)):
            module.weight.copy_(torch.from_numpy(np.asarray(jax_module.kernel[...]).T.copy()))
            module.bias.copy_(torch.from_numpy(np.asarray(jax_module.bias[...])))
    np.testing.assert_allclose(logits, torch_logits(torch_cls, ids, mask), atol=1e-4)
    assert np.abs(logits).max() > 1e-3  # a head that computes something


@pytest.mark.parametrize("name", ["llama", "qwen2_bias_tied", "gemma3_local_global_rope"])
def test_bfloat16_load_stays_close(name, tmp_path):
    """bf16 weights and compute: 8 mantissa bits give ~1e-2 relative error per op; over two
    layers the logits stay within 0.1 of float32 (logit scale here is ~1)."""
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path, dtype="bfloat16")
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ids, mask = hf_models.padded_batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
    expected = torch_logits(hf, ids, mask)
    np.testing.assert_allclose(got[mask == 1], expected[mask == 1], atol=0.1)


def test_packed_segments_equal_separate_examples(tmp_path):
    """Two examples packed into one row give the logits each gives alone."""
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS["llama_gqa_untied_llama3_rope"]())
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    rng = np.random.RandomState(1)
    a, b = rng.randint(1, 128, 5), rng.randint(1, 128, 7)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 7 + [0, 0]])
    positions = np.array([list(range(5)) + list(range(7)) + [0, 0]])
    got = np.asarray(
        model(
            jnp.asarray(packed), segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions)
        )
    )
    alone_a = np.asarray(model(jnp.asarray(a[None])))
    alone_b = np.asarray(model(jnp.asarray(b[None])))
    np.testing.assert_allclose(got[0, :5], alone_a[0], atol=1e-4)
    np.testing.assert_allclose(got[0, 5:12], alone_b[0], atol=1e-4)


@pytest.mark.parametrize("name", sorted(hf_models.CAUSAL_CONFIGS) + ["bert"])
def test_every_family_provides_the_written_interface(name, tmp_path):
    """What the rest of jaxft reads of a model (`jaxft.models.family`) is there for every
    family, with transformers' own values for the sizes it derives."""
    from jaxft import models
    from jaxft.hf import hub
    from jaxft.hf.model import model_config

    hf_config = hf_models.bert_config() if name == "bert" else hf_models.CAUSAL_CONFIGS[name]()
    cls = transformers.BertModel if name == "bert" else None
    hf_models.build(hf_config, **({"cls": cls} if cls else {})).save_pretrained(tmp_path)
    family, cfg = model_config(hub.read_config(tmp_path), name)
    assert family in models.FAMILIES and isinstance(family, models.Family)
    assert isinstance(cfg, models.ModelConfig)
    heads = hf_config.num_attention_heads
    assert cfg.num_key_value_heads == getattr(hf_config, "num_key_value_heads", heads)
    assert cfg.head_dim == (getattr(hf_config, "head_dim", None) or
                            hf_config.hidden_size // heads)
    learned = {"gpt2": "n_positions", "bert": "max_position_embeddings"}
    assert cfg.position_limit == (getattr(hf_config, learned[name]) if name in learned
                                  else None)
    model = jaxft.from_pretrained(tmp_path)
    assert isinstance(model.config, models.ModelConfig)
    assert isinstance(model, models.CausalLM) == (name != "bert")
