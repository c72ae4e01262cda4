"""Model dropout sits where transformers' does, at the config's rates.

Dropout masks cannot match PyTorch's bit for bit, but their effect can: for each dropout draw,
the mean squared distance of the training-mode logits from the eval-mode logits. Its mean over
many draws depends on every site and rate (a missing or misplaced dropout changes it), so it must
equal PyTorch's (`model.train()`) within the statistical error of the two samples. Eval mode,
what `from_pretrained` returns, matches transformers' logits exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxft
from jaxft import train_step
from jaxft.models import layers
from tests import hf_models

DRAWS = 96
RATE = 0.3
IDS = np.random.RandomState(0).randint(1, hf_models.VOCAB, (4, 24))

MODELS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=hf_models.VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        embd_pdrop=RATE, attn_pdrop=RATE, resid_pdrop=RATE),
    "llama_attention_dropout": lambda: hf_models.llama_config(attention_dropout=RATE),
    "bert_classifier": lambda: hf_models.bert_config(
        num_labels=3, hidden_dropout_prob=RATE, attention_probs_dropout_prob=RATE),
}


def torch_logits(hf) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(IDS)).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_mode_matches_pytorch_in_distribution(name, tmp_path):
    cls = (transformers.BertForSequenceClassification if name == "bert_classifier"
           else transformers.AutoModelForCausalLM)
    hf = hf_models.build(MODELS[name](), cls=cls)
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids = jnp.asarray(IDS, jnp.int32)
    reference = torch_logits(hf.eval())
    eval_logits = np.asarray(model(ids))  # from_pretrained gives eval mode, as transformers'
    np.testing.assert_allclose(eval_logits, reference, atol=1e-5)

    hf.train()
    theirs = []
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        theirs.append(np.mean((torch_logits(hf) - reference) ** 2))
    model.train()
    graphdef, weights, keys = nnx.split(model, nnx.Param, layers.DropoutKey)

    @jax.vmap
    def one_draw(rng):
        fresh = train_step.fresh_dropout_keys(keys, rng)
        return jnp.mean((nnx.merge(graphdef, weights, fresh)(ids) - eval_logits) ** 2)

    ours = np.asarray(one_draw(jax.random.split(jax.random.PRNGKey(0), DRAWS)))
    theirs = np.asarray(theirs)
    error = np.sqrt(ours.var() / DRAWS + theirs.var() / DRAWS)
    assert theirs.mean() > 10 * error  # the statistic resolves dropout's effect
    assert abs(ours.mean() - theirs.mean()) < 4 * error, (ours.mean(), theirs.mean(), error)
