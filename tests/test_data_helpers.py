"""Real, small tokenizers and sample-data paths shared by the `test_data_*` modules (no tests here).

The causal-LM tokenizer is a byte-level BPE trained in a second on the sample files below, wrapped
in `PreTrainedTokenizerFast` with a real ChatML Jinja template and saved with `save_pretrained`:
a true HF tokenizer directory, loaded back through `jaxft.data.load_tokenizer`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jaxft import data
from tests.real_weights import minilm_dir, package_dir  # noqa: F401  (re-exported)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SUPPORT_CHAT = os.path.join(DATA_DIR, "support_chat.jsonl")
FAQ = os.path.join(DATA_DIR, "faq_prompt_completion.jsonl")
MEDICAL = os.path.join(DATA_DIR, "medical_text.txt")
TICKETS = os.path.join(DATA_DIR, "tickets_classify.csv")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# The files the tiny tokenizer learns from: named, so that a new sample file never changes the
# tokenizer (and with it every tiny model's vocabulary) under the tests already written.
CORPUS_FILES = ("faq_prompt_completion.jsonl", "medical_text.txt", "support_chat.jsonl",
                "tickets_classify.csv")


def _corpus() -> list[str]:
    texts = []
    for path in (os.path.join(DATA_DIR, name) for name in CORPUS_FILES):
        with open(path, encoding="utf-8") as fh:
            texts.extend(fh.read().splitlines())
    return texts


def tiny_bpe(directory: str, *, chat_template: bool = True) -> PreTrainedTokenizerBase:
    """Train, save and reload a 600-token byte-level BPE; ChatML template unless told not to."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(directory)
    return data.load_tokenizer(directory)


def config(train_path: str, **overrides) -> object:
    cfg = data.default_config()
    cfg.train_path = train_path
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def trained_spans(tok: PreTrainedTokenizerBase, batch: dict, row: int) -> list[str]:
    """Decoded runs of consecutive trained targets in one row, per segment."""
    mask = batch["loss_mask"][row] > 0
    seg = batch["segment_ids"][row]
    spans, current, prev = [], [], None
    for t in range(len(mask)):
        key = (seg[t], True) if mask[t] else None
        if key != prev and current:
            spans.append(tok.decode(current))
            current = []
        if mask[t]:
            current.append(int(batch["targets"][row, t]))
        prev = key
    if current:
        spans.append(tok.decode(current))
    return spans


def all_batches(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
