"""`load_tokenizer` for directories and GGUF files, and SmolLM2's real chat template end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import transformers

from jaxft import data
from jaxft.errors import JaxftError
from tests.real_weights import smollm2_gguf_path
from tests.test_data_helpers import SUPPORT_CHAT, config, minilm_dir, read_jsonl


@pytest.fixture(scope="module")
def smollm2():
    return data.load_tokenizer(smollm2_gguf_path())


@pytest.mark.slow
def test_gguf_tokenizer_has_its_chat_template(smollm2):
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    assert smollm2.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_gguf_tokenizer_equals_transformers_own_and_needs_no_torch(smollm2):
    """jaxft reads the vocabulary with the `gguf` package; transformers' reader needs torch."""
    path = smollm2_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = ["Where is my order?", "  spaces, émojis 🤖 and\nnew lines\t",
             "<|im_start|>user\nhi<|im_end|>", ""]
    for text in texts:
        assert smollm2(text)["input_ids"] == reference(text)["input_ids"], text
    chat = [{"role": "user", "content": "What is a computer?"},
            {"role": "assistant", "content": "A machine that computes."}]
    assert (smollm2.apply_chat_template(chat, tokenize=False)
            == reference.apply_chat_template(chat, tokenize=False))
    assert len(smollm2) == len(reference)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "padding_side"):
        assert getattr(smollm2, name) == getattr(reference, name), name

    blocked = ("import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
               "from jaxft import data\n"
               f"tok = data.load_tokenizer({path!r})\n"
               "print(tok('Where is my order?')['input_ids'])")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(reference("Where is my order?")["input_ids"])


@pytest.mark.slow
def test_directory_holding_only_a_gguf_file(smollm2, tmp_path):
    os.symlink(smollm2_gguf_path(), tmp_path / "model.gguf")
    tok = data.load_tokenizer(str(tmp_path))
    text = "Where is my order? It was supposed to arrive yesterday."
    assert tok(text)["input_ids"] == smollm2(text)["input_ids"]


@pytest.mark.slow
def test_smollm2_template_masks_exactly_the_assistant_turns(smollm2):
    conversations = [r["messages"] for r in read_jsonl(SUPPORT_CHAT)]
    bundle = data.build_data(config(SUPPORT_CHAT, max_len=512, eval_fraction=0.0), smollm2,
                             global_batch_size=8, process_index=0, process_count=1)
    assert bundle.stats["truncated"] == 0
    by_text = {smollm2.apply_chat_template(m, tokenize=False): m for m in conversations}
    checked = 0
    it = bundle.train
    for _ in range(-(-len(it.epoch_rows(0)) // 8)):
        batch = next(it)
        for r in range(8):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                text = smollm2.decode(batch["input_ids"][r][seg == s])
                # every conversation gets a system turn (SmolLM's default one when the row has
                # none); the exact comparison below shows it is never trained on
                assert text.startswith("<|im_start|>system\n")
                messages = by_text[text]
                trained = (batch["loss_mask"][r] > 0) & (seg == s)
                runs = _runs(trained)
                decoded = [smollm2.decode(batch["targets"][r][run]) for run in runs]
                assert decoded == [m["content"] + "<|im_end|>" for m in messages
                                   if m["role"] == "assistant"]
                assert all(batch["targets"][r][run[-1]] == smollm2.eos_token_id for run in runs)
                checked += 1
    assert checked >= len(conversations)


def _runs(mask):
    runs, run = [], []
    for t in mask.nonzero()[0]:
        if run and t != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(t)
    return runs + [run] if run else runs


def test_directory_and_hub_errors(tmp_path):
    with pytest.raises(JaxftError, match=r"^GGUF file not found: .*missing\.gguf$"):
        data.load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(JaxftError, match=r"no tokenizer files found \(expected one of "):
        data.load_tokenizer(str(tmp_path))
    with pytest.raises(JaxftError, match=r"tokenizer path is not a model directory or \.gguf file"):
        data.load_tokenizer(str(tmp_path / "nothing-here"))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        with pytest.raises(JaxftError, match=r"^could not load a tokenizer from "
                                             r"no-such-org-xyz/no-such-model: "):
            data.load_tokenizer("no-such-org-xyz/no-such-model")


@pytest.mark.slow
def test_model_directory(tmp_path):
    bert = data.load_tokenizer(minilm_dir())
    assert bert("hello world")["input_ids"] == [101, 7592, 2088, 102]
