"""Generation parity with transformers `generate`, cache correctness, sampling semantics."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

import jaxft
from jaxft import generate as G
from jaxft import lora
from jaxft.hf.tokenizer import load_tokenizer
from tests import hf_models
from tests.real_weights import smollm2_gguf_path, smollm2_transformers

PAD = 0
NEW = 32


def prompts(seed: int = 0, lengths=(5, 11, 3)) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(3, hf_models.VOCAB, n).tolist() for n in lengths]


def hf_generate(model, ids, mask, eos, new=NEW) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                             eos_token_id=eos)
    return out[:, ids.shape[1]:].numpy()


def lively(name: str):
    """A tiny config initialised at std 0.2 instead of 0.02: the default's near-uniform logits
    make greedy decoding repeat one token forever, which would compare little after step 1."""
    config = hf_models.CAUSAL_CONFIGS[name]()
    # Gemma scales embeddings by √d, so a smaller init is as lively there.
    config.initializer_range = 0.05 if name.startswith("gemma") else 0.2
    # transformers' generate cannot compute the load-balancing loss on a cached step (its mask
    # covers the whole sequence, the step's router logits one token), which it tries with this on.
    config.output_router_logits = False
    if getattr(config, "final_logit_softcapping", None):
        # The tiny config's caps would saturate tanh here and tie logits at the cap, leaving
        # greedy decoding to rounding; Gemma 2's released caps (30, 50) apply instead.
        config.final_logit_softcapping, config.attn_logit_softcapping = 30.0, 50.0
    return config


def first_new_token(tokens: np.ndarray) -> tuple[int, int]:
    """(row, step) of a token first emitted after step 8, for use as EOS mid-generation."""
    for step in range(8, tokens.shape[1] - 2):
        for row in range(tokens.shape[0]):
            if tokens[row, step] not in tokens[row, :step]:
                return row, step
    raise AssertionError(f"every row repeats itself early: {tokens}")


LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "phi3_longrope_window": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                # experts are not nn.Linear: PEFT's target_modules reach attention only
                **dict.fromkeys(["qwen3_moe_topk_norm", "qwen3_moe_top3_raw",
                                 "mixtral_gqa_window", "gpt_oss_sinks_window"],
                                ["q_proj", "k_proj", "v_proj", "o_proj"])}
# Runs with adapters cover the base model's path too (the adapters add to it); the base alone
# is compared for LLaMA, the family every other one is read against.
FAMILIES = ["qwen2_bias_tied", "gpt2", "mistral_gqa", "qwen3_qk_norm_mixed_window",
            "phi3_longrope_window", "gemma2_softcap_window", "gemma3_local_global_rope",
            "qwen3_moe_topk_norm", "qwen3_moe_top3_raw", "mixtral_gqa_window",
            "gpt_oss_sinks_window"]


def add_lora(model, hf, name: str):
    """A non-zero rank-4 adapter on every projection of both models, with the same values."""
    import peft

    targets = LORA_TARGETS.get(name, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, targets=tuple(targets)), seed=1)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 lora_dropout=0.0,
                                                 fan_in_fan_out=name == "gpt2"))
    rng = np.random.RandomState(2)
    for path, linear in lora.linear_modules(model):
        if linear.adapter is None:
            continue
        b = linear.adapter.lora_b
        b[...] = jnp.asarray(rng.normal(0, 0.2, b.shape), b.dtype)
        a, b = np.asarray(linear.adapter.lora_a[...]), np.asarray(b[...])
        for layer, hf_path in enumerate(lora.hf_paths(model, path)):
            module = hf.get_submodule("base_model.model." + hf_path)
            module.lora_A["default"].weight.data = torch.tensor(a[layer].T.copy())
            module.lora_B["default"].weight.data = torch.tensor(b[layer].T.copy())
    return hf.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, with_lora", [("llama", False), ("llama", True)]
                         + [(name, True) for name in FAMILIES])
def test_greedy_matches_transformers_generate(name, with_lora, tmp_path):
    """Left-padded prompts of lengths 5/11/3, 32 new tokens, token for token. EOS is a token
    one row first emits mid-way, so early stopping and pad-after-EOS are compared too."""
    hf = hf_models.build(lively(name))
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids, mask = G.left_pad(prompts(), PAD)
    base = G.generate_ids(model, ids, mask, max_new_tokens=NEW, pad_id=PAD)
    if with_lora:
        hf = add_lora(model, hf, name)
    no_eos = G.generate_ids(model, ids, mask, max_new_tokens=NEW, pad_id=PAD)
    if with_lora:  # the adapter must matter, or this compares nothing new
        assert (no_eos != base).any()
    row, step = first_new_token(no_eos)
    eos = int(no_eos[row, step])
    got = G.generate_ids(model, ids, mask, max_new_tokens=NEW, eos_ids=[eos], pad_id=PAD)
    expected = hf_generate(hf, ids, mask, eos)
    assert got[row, step] == eos and (got[row, step + 1:] == PAD).all()
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == PAD).all()  # transformers stops once all rows are done


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_gqa_untied_llama3_rope", "gpt2", "mistral_gqa",
                                  "gemma2_softcap_window", "gemma3_local_global_rope",
                                  "qwen3_moe_top3_raw", "mixtral_gqa_window",
                                  "gpt_oss_sinks_window"])
def test_cached_decode_matches_full_forward(name, tmp_path):
    """Prefill 11 left-padded tokens, then decode 4 one at a time: the logits of each are those
    of one forward over the whole sequence (mistral's window of 6 and Gemma's of 5 are
    crossed, on Gemma's local layers only)."""
    hf = hf_models.build(hf_models.CAUSAL_CONFIGS[name]())
    hf.save_pretrained(tmp_path)
    model = jaxft.from_pretrained(tmp_path)
    ids, mask = G.left_pad(prompts(lengths=(11, 4, 7)), PAD)
    extra = np.random.RandomState(3).randint(3, hf_models.VOCAB, (3, 4)).astype(np.int32)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    positions = G.positions_from_mask(jnp.asarray(full_mask))
    expected = np.asarray(model(jnp.asarray(full_ids), segment_ids=jnp.asarray(full_mask),
                                positions=positions))
    cache = G.new_cache(model, 3, full_ids.shape[1] + 2)  # spare empty slots must not matter
    t = ids.shape[1]
    logits, cache = model(jnp.asarray(ids), segment_ids=jnp.asarray(mask),
                          positions=positions[:, :t], cache=cache)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[:, :t][real], atol=1e-4, rtol=0)
    for i in range(extra.shape[1]):
        logits, cache = model(jnp.asarray(extra[:, i:i + 1]), segment_ids=jnp.ones((3, 1), int),
                              positions=positions[:, t + i:t + i + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, t + i], atol=1e-4,
                                   rtol=0)
    assert int(cache.end) == full_ids.shape[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_models.build(lively("llama")).save_pretrained(path)
    return jaxft.from_pretrained(path)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_llama):
    ids, mask = G.left_pad(prompts(), PAD)

    def run(**kw):
        return G.generate_ids(tiny_llama, ids, mask, max_new_tokens=16,
                              sampling=G.Sampling(**kw))

    hot = dict(temperature=1.5, top_p=0.95)
    np.testing.assert_array_equal(run(seed=7, **hot), run(seed=7, **hot))
    assert (run(seed=7, **hot) != run(seed=8, **hot)).any()
    np.testing.assert_array_equal(run(temperature=0.7, top_k=1, seed=3), run())


def test_filters_match_transformers_warpers():
    """Temperature, then top-k, then top-p, against transformers' own logits processors."""
    logits = np.random.RandomState(0).normal(0, 3, (4, 50)).astype(np.float32)
    for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5),
                                      (1.0, 0, 1.0)]:
        processors = [logits_process.TemperatureLogitsWarper(temperature)]
        if top_k:
            processors.append(logits_process.TopKLogitsWarper(top_k))
        if top_p < 1:
            processors.append(logits_process.TopPLogitsWarper(top_p))
        expected = torch.tensor(logits)
        for p in processors:
            expected = p(None, expected)
        got = np.asarray(G.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected.numpy()))
        kept = ~np.isinf(got)
        np.testing.assert_allclose(got[kept], expected.numpy()[kept], rtol=1e-6)


def test_generation_compiles_once_per_shape(tiny_llama, monkeypatch):
    """Sampling settings are traced values: new temperatures, k, p and seeds reuse the compiled
    loop. Only switching top-k/top-p filtering on or off compiles once more (without it, no
    step sorts the vocabulary)."""
    traces = []
    new_cache = G.new_cache
    monkeypatch.setattr(G, "new_cache", lambda *a: traces.append(1) or new_cache(*a))
    ids, mask = G.left_pad(prompts(lengths=(6, 2)), PAD)
    filtered = [(1, 0.5, 3, 0.9), (2, 2.0, 7, 0.3), (3, 1.0, 5, 1.0)]
    unfiltered = [(0, 1.0, 0, 1.0), (4, 0.7, 0, 1.0)]
    for seed, temperature, top_k, top_p in filtered + unfiltered:
        G.generate_ids(tiny_llama, ids + seed, mask, max_new_tokens=5,
                       sampling=G.Sampling(temperature, top_k, top_p, seed))
    assert len(traces) == 2


def test_sampling_without_filters_draws_what_neutral_filters_draw():
    """The unfiltered path (top-k 0, top-p 1: no vocabulary sort) samples from the very
    distribution the filtering path leaves untouched: the same tokens for the same keys."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 300)) * 3
    for seed in range(8):
        key = jax.random.PRNGKey(seed)
        neutral = G.sample(logits, key, 0.7, jnp.int32(0), jnp.float32(1.0), filtered=True)
        plain = G.sample(logits, key, 0.7, jnp.int32(0), jnp.float32(1.0), filtered=False)
        np.testing.assert_array_equal(np.asarray(neutral), np.asarray(plain))


def test_bad_arguments_are_one_line_errors(tiny_llama):
    ids, mask = G.left_pad(prompts(), PAD)
    with pytest.raises(jaxft.JaxftError, match="top_p"):
        G.generate_ids(tiny_llama, ids, mask, max_new_tokens=4, sampling=G.Sampling(top_p=0))
    with pytest.raises(jaxft.JaxftError, match="cache_length"):
        G.generate_ids(tiny_llama, ids, mask, max_new_tokens=4, cache_length=ids.shape[1])
    with pytest.raises(jaxft.JaxftError, match="at least one token"):
        G.left_pad([[1, 2], []], PAD)
    with pytest.raises(jaxft.JaxftError, match="left-padded"):
        G.generate_ids(tiny_llama, ids, mask[:, ::-1], max_new_tokens=4)


def test_peft_adapter_loads_for_generation(tmp_path):
    """`--adapter`: a PEFT directory written by jaxft.hf.adapters generates as the model it came
    from."""
    from jaxft.hf import adapters

    hf_models.build(lively("qwen2_bias_tied")).save_pretrained(tmp_path / "base")
    model = jaxft.from_pretrained(tmp_path / "base")
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora.apply_lora(model, cfg, seed=1)
    for _, linear in lora.linear_modules(model):
        if linear.adapter is not None:
            b = linear.adapter.lora_b
            b[...] = jnp.asarray(np.random.RandomState(0).normal(0, 0.2, b.shape), b.dtype)
    adapters.save_peft_adapter(model, cfg, tmp_path / "adapter")
    loaded, path = G.load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert path == str(tmp_path / "base")
    ids, mask = G.left_pad(prompts(), PAD)
    np.testing.assert_array_equal(G.generate_ids(loaded, ids, mask, max_new_tokens=NEW),
                                  G.generate_ids(model, ids, mask, max_new_tokens=NEW))


# ---------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 by both sides)
# ---------------------------------------------------------------------------------------------

REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    [{"role": "user", "content": "What is the capital of France?"}],  # chat-templated
]


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' greedy completions, before jaxft loads the model here.

    torch runs on one thread: its intra-op threads wait on each other, and on a busy machine
    (or beside XLA's own CPU thread pool) one thread measured 10x faster than two.
    """
    path = Path(smollm2_gguf_path())
    hf = smollm2_transformers()
    tokenizer = load_tokenizer(str(path))
    encoded = [tokenizer(p)["input_ids"] if isinstance(p, str) else
               tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
               for p in REAL_PROMPTS]
    ids, mask = G.left_pad(encoded, tokenizer.pad_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long),
                              max_new_tokens=16, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    texts = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
    return path, tokenizer, texts


@pytest.mark.slow
def test_smollm2_greedy_completions_match_transformers(smollm2_reference):
    path, tokenizer, expected = smollm2_reference
    model = jaxft.from_pretrained(path)
    got = G.generate(model, tokenizer, REAL_PROMPTS, max_new_tokens=16)
    assert got == expected
    assert "Paris" in got[0] and "Paris" in got[2]


@pytest.mark.slow
def test_cli_prints_completions():
    smollm2_gguf_path()  # skips without the package
    out = subprocess.run(
        [sys.executable, "-m", "jaxft.generate", "--prompt=The capital of France is",
         "--max_new_tokens=4", "--prompt=What is 2+2?", "--chat"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "### The capital of France is" in out.stdout and "### What is 2+2?" in out.stdout


@pytest.mark.slow
def test_cli_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "jaxft.generate", "--model=/nonexistent",
                          "--prompt=hi"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: /nonexistent")
