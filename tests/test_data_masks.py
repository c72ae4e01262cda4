"""The loss mask covers exactly the tokens we mean to train on, checked by decoding them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft import data
from jaxft.data import chat, encode, files, formats
from jaxft.errors import JaxftError
from tests.test_data_helpers import (
    FAQ,
    MEDICAL,
    SUPPORT_CHAT,
    TICKETS,
    config,
    read_jsonl,
    tiny_bpe,
    trained_spans,
    write_jsonl,
)


def build(cfg, tok, **kwargs):
    kwargs.setdefault("global_batch_size", 4)
    return data.build_data(cfg, tok, process_index=0, process_count=1, **kwargs)


def epoch_batches(bundle):
    """All batches of the first epoch (the last one may run into epoch 1, so stop at the row)."""
    it = bundle.train
    n_rows = len(it.epoch_rows(0))
    out = []
    for _ in range(-(-n_rows // it.global_batch_size)):
        out.append(next(it))
    return out


def segments(batch):
    """(row, segment id) of every example in the batch."""
    for r in range(batch["segment_ids"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s:
                yield r, s


def segment_text(tok, batch, r, s):
    return tok.decode(batch["input_ids"][r][batch["segment_ids"][r] == s])


def test_prompt_completion_trains_on_completion_and_eos_only(tok):
    rows = read_jsonl(FAQ)
    by_text = {r["prompt"] + r["completion"] + tok.eos_token: r for r in rows}
    bundle = build(config(FAQ, max_len=128, eval_fraction=0.0), tok)
    seen = []
    for batch in epoch_batches(bundle):
        for r, s in segments(batch):
            row = by_text[segment_text(tok, batch, r, s)]
            masked = batch["loss_mask"][r] * (batch["segment_ids"][r] == s)
            target_ids = batch["targets"][r][masked > 0]
            assert tok.decode(target_ids) == row["completion"] + tok.eos_token
            seen.append(row["prompt"])
    assert sorted(seen[: len(rows)]) == sorted(r["prompt"] for r in rows)


def test_alpaca_layout_uses_the_alpaca_prompt(tok, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Summarize the refund policy.", "input": "Refunds take 5 days.",
         "output": "Refunds arrive within five days."},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    ])
    bundle = build(config(path, max_len=256, eval_fraction=0.0, packing=False), tok,
                   global_batch_size=2)
    assert bundle.format == "prompt_completion"
    batch = next(bundle.train)
    texts = {segment_text(tok, batch, r, 1): trained_spans(tok, batch, r) for r in range(2)}
    with_input = formats.alpaca_prompt("Summarize the refund policy.", "Refunds take 5 days.")
    assert "### Input:\nRefunds take 5 days." in with_input
    assert texts[with_input + "Refunds arrive within five days." + tok.eos_token] == [
        "Refunds arrive within five days." + tok.eos_token]
    no_input = formats.alpaca_prompt("Say hello.", "")
    assert texts[no_input + "Hello!" + tok.eos_token] == ["Hello!" + tok.eos_token]


def test_messages_train_on_every_assistant_turn(tok):
    conversations = [r["messages"] for r in read_jsonl(SUPPORT_CHAT)]
    by_text = {tok.apply_chat_template(m, tokenize=False): m for m in conversations}
    bundle = build(config(SUPPORT_CHAT, max_len=1024, eval_fraction=0.0), tok)
    assert bundle.stats["truncated"] == 0
    multi_turn = 0
    for batch in epoch_batches(bundle):
        for r, s in segments(batch):
            messages = by_text[segment_text(tok, batch, r, s)]
            masked = (batch["loss_mask"][r] > 0) & (batch["segment_ids"][r] == s)
            spans, run = [], []
            for t in np.flatnonzero(masked):  # split the trained targets into contiguous runs
                if run and t != run[-1] + 1:
                    spans.append(run)
                    run = []
                run.append(t)
            spans.append(run)
            decoded = [tok.decode(batch["targets"][r][run]) for run in spans]
            answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
            assert decoded == answers
            im_end = tok.convert_tokens_to_ids("<|im_end|>")  # one special token, not characters
            assert all(batch["targets"][r][run[-1]] == im_end for run in spans)
            multi_turn += len(answers) > 1
    assert multi_turn >= 3


def test_messages_from_a_csv_cell_holding_json(tok, tmp_path):
    conversation = read_jsonl(SUPPORT_CHAT)[1]["messages"]
    import pandas as pd
    pd.DataFrame({"messages": [json.dumps(conversation)] * 2}).to_csv(tmp_path / "c.csv",
                                                                      index=False)
    bundle = build(config(str(tmp_path / "c.csv"), max_len=512, eval_fraction=0.0,
                          packing=False), tok, global_batch_size=2)
    assert trained_spans(tok, next(bundle.train), 0) == [conversation[1]["content"] +
                                                         "<|im_end|>"]


def test_no_chat_template_is_an_error_unless_chatml_is_chosen(tmp_path):
    plain = tiny_bpe(str(tmp_path / "plain"), chat_template=False)
    with pytest.raises(JaxftError, match=r"^tokenizer .* has no chat template; set "
                                         r"data.chat_template='chatml' \(or a Jinja template\)$"):
        build(config(SUPPORT_CHAT), plain)
    bundle = build(config(SUPPORT_CHAT, chat_template="chatml", max_len=1024,
                          eval_fraction=0.0, packing=False), plain, global_batch_size=1)
    rendered = {plain.apply_chat_template(r["messages"], chat_template=chat.CHATML,
                                          tokenize=False): r["messages"]
                for r in read_jsonl(SUPPORT_CHAT)}
    batch = next(bundle.train)
    conversation = rendered[segment_text(plain, batch, 0, 1)]
    answers = [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
    assert trained_spans(plain, batch, 0) == answers
    with pytest.raises(JaxftError, match=r"data.chat_template must be one of \['chatml'\] or a "
                                         r"Jinja template, got 'llama9'"):
        build(config(SUPPORT_CHAT, chat_template="llama9"), plain)


def test_template_that_rewrites_prefixes_is_caught(tok, tmp_path):
    unstable = "{{ messages|length }}" + chat.CHATML  # the header changes as turns are added
    rows = read_jsonl(SUPPORT_CHAT)[:3]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(JaxftError, match=r"chat\.jsonl line 1: the chat template renders turn 3 "
                                         r"differently as a prefix"):
        build(config(path, chat_template=unstable), tok)


def test_bad_conversations_name_their_line(tok, tmp_path):
    good = read_jsonl(SUPPORT_CHAT)[1]
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}]}, "conversation has no assistant turn"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
         r"message 1 needs string 'role' and 'content', has \['role'\]"),
        ({"messages": [{"role": "user", "content": "hi"}, "oops"]},
         r"column 'messages' has a different structure than in most rows"),
        ({"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "x"}]},
         "conversation starts with an assistant turn"),
        # A role no template knows would be rendered as text (or dropped) and trained on.
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
         "message 2 has role 'wizard', expected one of system, developer, user, assistant, "
         "tool, ipython"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"chat{i}.jsonl", [good, bad, good])
        with pytest.raises(JaxftError, match=rf"chat{i}\.jsonl line 2: {message}"):
            build(config(path, eval_fraction=0.0), tok)
        bundle = build(config(path, eval_fraction=0.0, skip_bad_rows=True, max_len=512), tok)
        assert bundle.stats["skipped_bad_rows"] == 1 and bundle.stats["examples"] == 2


def test_truncation_and_dropping_are_counted(tok):
    truncated = build(config(SUPPORT_CHAT, max_len=160, eval_fraction=0.0), tok)
    dropped = build(config(SUPPORT_CHAT, max_len=160, eval_fraction=0.0, overlong="drop"), tok)
    n = len(read_jsonl(SUPPORT_CHAT))
    t = truncated.stats
    assert t["truncated"] > 0 and t["examples"] + t["dropped_no_target"] == n
    d = dropped.stats
    assert d["dropped_overlong"] == t["truncated"] + t["dropped_no_target"]
    assert d["examples"] == n - d["dropped_overlong"]
    batch = next(truncated.train)
    assert batch["positions"].max() == 159  # a truncated example fills its row exactly


def test_text_documents_are_chunked_with_every_pair_trained_once(tok):
    loaded = files.read_files(MEDICAL, skip_bad_rows=False)
    schema = formats.Schema("text", {"text": "text"})
    examples, stats = encode.encode(loaded, schema, tok, config(MEDICAL, max_len=48))
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in loaded.rows["text"]]
    assert stats["truncated"] == 0 and stats["examples"] > len(docs)  # long docs were split
    assert (examples.lengths <= 48).all()
    k = 0
    for doc in docs:
        rebuilt = []
        while len(rebuilt) < len(doc):
            a, b = examples.offsets[k], examples.offsets[k + 1]
            piece, mask = examples.tokens[a:b].tolist(), examples.target_mask[a:b].tolist()
            assert mask == [0] + [1] * (len(piece) - 1)
            rebuilt += piece if not rebuilt else piece[1:]  # pieces overlap by one token
            k += 1
        assert rebuilt == doc
    assert k == len(examples)
    assert stats["target_tokens"] == sum(len(d) - 1 for d in docs)


def test_classification_batches(bert):
    bundle = build(config(TICKETS, max_len=24, eval_fraction=0.0, packing=True), bert,
                   task="classification", global_batch_size=8)
    batch = next(bundle.train)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((8, 24), "int32"), "attention_mask": ((8, 24), "int32"),
        "token_type_ids": ((8, 24), "int32"), "labels": ((8,), "int32"),
        "valid": ((8,), "float32")}
    import csv
    with open(TICKETS) as fh:
        label_of = {r["text"].lower(): r["label"] for r in csv.DictReader(fh)}
    id2label = {v: k for k, v in bundle.label_map.items()}
    for r in range(8):
        n = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r][:n]
        assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
        assert (batch["input_ids"][r][n:] == bert.pad_token_id).all()
        text = bert.decode(ids, skip_special_tokens=True)
        assert id2label[int(batch["labels"][r])] == label_of[text]


def test_classification_pairs_and_overlong(bert, tmp_path):
    rows = [{"text": "my card was charged twice", "pair": "billing question", "label": 1},
            {"text": " ".join(["very long ticket"] * 20), "pair": "x", "label": 0}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = config(path, max_len=16, eval_fraction=0.0, text_pair_column="pair")
    bundle = build(cfg, bert, task="classification", global_batch_size=2)
    assert bundle.stats["truncated"] == 1 and bundle.label_map == {"0": 0, "1": 1}
    batch = next(bundle.train)
    short = int(np.argmax(batch["labels"]))
    n = int(batch["attention_mask"][short].sum())
    assert batch["token_type_ids"][short][:n].tolist() == [0] * 7 + [1] * 3
    long = 1 - short
    assert batch["attention_mask"][long].all() and batch["input_ids"][long][-1] == 102
    cfg.overlong = "drop"
    assert build(cfg, bert, task="classification", global_batch_size=2).stats[
        "dropped_overlong"] == 1


def test_labels_outside_the_label_map(bert, tmp_path):
    cfg = config(TICKETS, label_map={"billing": 0, "shipping": 1, "technical": 2})
    with pytest.raises(JaxftError, match=r"tickets_classify\.csv row 31: label 'account' is not "
                                         r"in the label map \(billing, shipping, technical\)"):
        build(cfg, bert, task="classification")
    cfg.skip_bad_rows = True
    cfg.eval_fraction = 0.0
    bundle = build(cfg, bert, task="classification")
    assert bundle.stats["skipped_bad_rows"] == 10 and bundle.stats["examples"] == 30
    path = tmp_path / "ints.jsonl"
    write_jsonl(path, [{"text": "a", "label": 0}, {"text": "b", "label": 7}])
    with pytest.raises(JaxftError, match=r"ints\.jsonl line 2: label 7 is not in the label map"):
        build(config(str(path), label_map={"no": 0, "yes": 1}, eval_fraction=0.0), bert,
              task="classification")


def test_label_map_covers_eval_labels_unless_given(bert, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "billing"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "b", "label": "refunds"}])
    cfg = config(str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"))
    bundle = build(cfg, bert, task="classification")
    assert bundle.label_map == {"billing": 0, "refunds": 1}
    cfg.label_map = {"billing": 0, "shipping": 1}
    with pytest.raises(JaxftError, match=r"eval\.jsonl line 1: label 'refunds' is not in the "
                                         r"label map \(billing, shipping\)"):
        build(cfg, bert, task="classification")


def test_task_and_format_must_agree(bert):
    with pytest.raises(JaxftError, match="task 'classification' needs data.format "
                                         "'classification', got 'text'"):
        build(config(TICKETS, format="text"), bert, task="classification")
    with pytest.raises(JaxftError, match="data.format 'classification' needs "
                                         "task='classification'"):
        build(config(TICKETS, format="classification"), bert)
