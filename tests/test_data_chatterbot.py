"""The built-in ChatterBot sources: real offline data with a fixed split."""

from __future__ import annotations

import importlib.util
import os

import pytest

from jaxft import data
from jaxft.data import chatterbot
from jaxft.errors import JaxftError
from tests.test_data_helpers import config, minilm_dir, package_dir, tiny_bpe, trained_spans

pytestmark = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                reason="pip install --no-deps chatterbot-corpus==1.3.3")


def test_corpus_has_21_topics_and_about_1200_distinct_pairs():
    paths = chatterbot.corpus_files()
    assert len(paths) == 21 and paths[0].startswith(package_dir("chatterbot_corpus"))
    triples, skipped = chatterbot.qa_pairs()
    assert {t for t, _, _ in triples} == {os.path.basename(p)[:-4] for p in paths}
    assert 1150 <= len({(q, a) for _, q, a in triples}) <= 1300
    # the trivia entry whose answer YAML folded into the question, named where it is
    trivia = next(p for p in paths if p.endswith("trivia.yml"))
    assert skipped == [f"{trivia} conversation 14: not a question followed by answers (str 'In "
                       "a game of bingo, which number is repr')"]


def test_chat_source_rows_and_stable_split():
    train, evals = chatterbot.load("chatterbot:chat")
    again_train, again_eval = chatterbot.load("chatterbot:chat")
    assert train.rows["messages"] == again_train.rows["messages"]
    assert evals.rows["messages"] == again_eval.rows["messages"]
    n = len(train.rows) + len(evals.rows)
    assert 1150 <= n <= 1300 and 0.05 < len(evals.rows) / n < 0.15
    first = train.rows[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    both = list(train.rows["messages"]) + list(evals.rows["messages"])
    pairs = [tuple(m["content"] for m in r) for r in both]
    assert len(set(pairs)) == len(pairs)  # de-duplicated
    train_q = {r[0]["content"] for r in train.rows["messages"]}
    eval_q = {r[0]["content"] for r in evals.rows["messages"]}
    assert not train_q & eval_q  # every answer to a question is on the same side


@pytest.mark.slow
def test_topics_source_classifies_questions_by_file(tmp_path):
    bert = data.load_tokenizer(minilm_dir())
    bundle = data.build_data(config("chatterbot:topics", max_len=32), bert, global_batch_size=8,
                             task="classification", process_index=0, process_count=1)
    assert len(bundle.label_map) == 21 and "tech_support" in bundle.label_map
    assert 700 <= bundle.stats["rows"] + bundle.stats["eval_rows"] <= 800
    batch = next(bundle.train)
    assert batch["labels"].shape == (8,) and batch["valid"].all()
    bundle.save_label_map(tmp_path / "labels.json")
    assert data.load_label_map(str(tmp_path / "labels.json")) == bundle.label_map


def test_chat_source_trains_on_the_answers(tmp_path):
    tok = tiny_bpe(str(tmp_path / "tok"))
    bundle = data.build_data(config("chatterbot:chat", max_len=256, packing=False), tok,
                             global_batch_size=4, process_index=0, process_count=1)
    assert bundle.format == "messages" and bundle.stats["skipped_bad_rows"] == 1
    answers = {r["messages"][1]["content"]
               for r in chatterbot.load("chatterbot:chat")[0].rows}
    batch = next(bundle.train)
    for r in range(4):
        (span,) = trained_spans(tok, batch, r)
        assert span.endswith("<|im_end|>") and span[: -len("<|im_end|>")] in answers


def test_unknown_builtin_and_missing_package(monkeypatch):
    with pytest.raises(JaxftError, match="unknown built-in source 'chatterbot:jokes'"):
        chatterbot.load("chatterbot:jokes")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a))
    with pytest.raises(JaxftError, match=r"^built-in chatterbot data needs the corpus package: "
                                         r"pip install --no-deps chatterbot-corpus==1\.3\.3$"):
        chatterbot.load("chatterbot:chat")
