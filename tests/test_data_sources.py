"""Reading files and hub-style names into rows; every bad-input error names the culprit."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxft import data
from jaxft.data import files, sources
from jaxft.errors import JaxftError
from tests.test_data_helpers import (
    FAQ,
    MEDICAL,
    SUPPORT_CHAT,
    TICKETS,
    config,
    read_jsonl,
    write_jsonl,
)


def build(cfg, tok, **kwargs):
    kwargs.setdefault("global_batch_size", 2)
    return data.build_data(cfg, tok, process_index=0, process_count=1, **kwargs)


# -- formats are detected from the columns ---------------------------------------------------

@pytest.mark.parametrize("path, fmt", [(SUPPORT_CHAT, "messages"), (FAQ, "prompt_completion"),
                                       (MEDICAL, "text")])
def test_sample_files_detect_their_format(tok, path, fmt):
    bundle = build(config(path, max_len=128), tok)
    assert bundle.format == fmt
    assert bundle.stats["examples"] > 0 and bundle.eval is not None


def test_csv_classification_and_label_map(bert, tmp_path):
    bundle = build(config(TICKETS, max_len=32), bert, task="classification")
    assert bundle.format == "classification"
    assert bundle.label_map == {"account": 0, "billing": 1, "shipping": 2, "technical": 3}
    path = tmp_path / "labels.json"
    bundle.save_label_map(path)
    assert data.load_label_map(str(path)) == bundle.label_map


def test_same_rows_from_jsonl_json_csv_parquet(tok, tmp_path):
    rows = read_jsonl(FAQ)
    import pandas as pd
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "faq.csv", index=False)
    frame.to_parquet(tmp_path / "faq.parquet")
    frame.to_json(tmp_path / "faq.json", orient="records")
    seen = []
    for name in ("faq.csv", "faq.parquet", "faq.json"):
        bundle = build(config(str(tmp_path / name), max_len=128, eval_fraction=0.0), tok)
        seen.append(next(bundle.train)["input_ids"])
    reference = next(build(config(FAQ, max_len=128, eval_fraction=0.0), tok).train)["input_ids"]
    for ids in seen:
        np.testing.assert_array_equal(ids, reference)


def test_glob_and_directory_concatenate_files(tmp_path):
    rows = read_jsonl(FAQ)
    write_jsonl(tmp_path / "a.jsonl", rows[:10])
    write_jsonl(tmp_path / "b.jsonl", rows[10:])
    by_glob = files.read_files(str(tmp_path / "*.jsonl"), skip_bad_rows=False)
    by_dir = files.read_files(str(tmp_path), skip_bad_rows=False)
    assert len(by_glob.rows) == len(by_dir.rows) == len(rows)
    assert by_glob.rows["prompt"] == [r["prompt"] for r in rows]
    assert by_glob.origin.where(1, 3) == f"{tmp_path / 'b.jsonl'} line 3"


def test_eval_fraction_split_is_seeded_and_disjoint():
    a = sources.load_split(FAQ, None, eval_fraction=0.2, seed=3, skip_bad_rows=False,
                           text_column="text")
    b = sources.load_split(FAQ, None, eval_fraction=0.2, seed=3, skip_bad_rows=False,
                           text_column="text")
    c = sources.load_split(FAQ, None, eval_fraction=0.2, seed=4, skip_bad_rows=False,
                           text_column="text")
    assert a.train.rows["_row"] == b.train.rows["_row"]
    assert a.train.rows["_row"] != c.train.rows["_row"]
    assert len(a.eval.rows) == 6 and len(a.train.rows) == 24
    assert not set(a.train.rows["_row"]) & set(a.eval.rows["_row"])


def test_eval_path_is_used_as_given(tok, tmp_path):
    rows = read_jsonl(FAQ)
    write_jsonl(tmp_path / "train.jsonl", rows[:25])
    write_jsonl(tmp_path / "eval.jsonl", rows[25:])
    bundle = build(config(str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"),
                          max_len=128), tok)
    assert bundle.stats["rows"] == 25 and bundle.stats["eval_rows"] == 5


# -- bad input: one line that names the file, row and what was expected -----------------------

def test_missing_file(tok, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(JaxftError, match=f"^data file not found: {missing}$"):
        build(config(missing), tok)


def test_no_files_match_glob(tmp_path):
    with pytest.raises(JaxftError, match=r"no data files match .*\*\.jsonl"):
        files.read_files(str(tmp_path / "*.jsonl"), skip_bad_rows=False)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(JaxftError, match=r"data\.xlsx: unsupported file type '\.xlsx'"):
        files.read_files(str(path), skip_bad_rows=False)


def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    rows = read_jsonl(FAQ)[:6]
    lines = [json.dumps(r) for r in rows]
    lines[3] = '{"prompt": "Q: broken", "completion": "oops"'  # line 4: unterminated object
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(JaxftError) as err:
        build(config(path), tok)
    assert str(err.value) == (f"{path} line 4: malformed JSON (Expecting ',' delimiter at "
                              "column 45)")
    assert "\n" not in str(err.value)


def test_non_object_jsonl_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "[1, 2]"])
    with pytest.raises(JaxftError, match=r"bad\.jsonl line 2: expected a JSON object, got a list"):
        build(config(path), tok)


def test_skip_bad_rows_skips_and_counts(tok, tmp_path):
    rows = read_jsonl(FAQ)
    lines = [json.dumps(r) for r in rows]
    lines[2] = "{not json"
    lines[7] = '"just a string"'
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    bundle = build(config(path, skip_bad_rows=True, eval_fraction=0.0, max_len=128), tok)
    assert bundle.stats["skipped_bad_rows"] == 2
    assert bundle.stats["examples"] == len(rows) - 2


def test_skip_bad_rows_counts_null_values(tok, tmp_path):
    rows = read_jsonl(FAQ)[:8]
    rows[5]["completion"] = None
    path = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(JaxftError, match=r"nulls\.jsonl line 6: prompt and completion must both"):
        build(config(path, eval_fraction=0.0), tok)
    bundle = build(config(path, eval_fraction=0.0, skip_bad_rows=True), tok)
    assert bundle.stats["skipped_bad_rows"] == 1 and bundle.stats["examples"] == 7


def test_malformed_csv(tok, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nhello,billing\ntoo,many,fields\nok,account\n")
    with pytest.raises(JaxftError, match=r"bad\.csv: cannot read as csv: .*line 3"):
        build(config(str(path)), tok, task="classification")
    bundle = build(config(str(path), skip_bad_rows=True, eval_fraction=0.0), tok,
                   task="classification")
    assert bundle.stats["skipped_bad_rows"] == 1 and bundle.stats["examples"] == 2


def test_mixed_types_in_a_column(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": "x"},
                                                  {"text": "b", "label": 3},
                                                  {"text": "c", "label": "y"}])
    with pytest.raises(JaxftError, match=r"mixed\.jsonl line 2: column 'label' holds a number "
                                         r"but most rows hold a string$"):
        files.read_files(path, skip_bad_rows=False)
    loaded = files.read_files(path, skip_bad_rows=True)
    assert loaded.bad_rows == 1 and loaded.rows["label"] == ["x", "y"]


def test_misnamed_columns_list_found_and_expected(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(JaxftError) as err:
        build(config(path), tok)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot detect the data format: found columns "
                          "['answer', 'question'], expected ['messages'] or ")
    assert "['completion', 'prompt']" in msg and "['text']" in msg and "\n" not in msg


def test_explicit_format_with_missing_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "answer": "a"}] * 4)
    with pytest.raises(JaxftError, match=r"cannot read format 'prompt_completion': found columns "
                                         r"\['answer', 'prompt'\], expected "
                                         r"\['completion', 'prompt'\] or \['instruction', "):
        build(config(path, format="prompt_completion"), tok)
    # renaming the column through the config fixes it
    bundle = build(config(path, format="prompt_completion", completion_column="answer",
                          eval_fraction=0.0), tok)
    assert bundle.stats["examples"] == 4


def test_eval_file_with_other_columns(tok, tmp_path):
    rows = read_jsonl(FAQ)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "x"}])
    with pytest.raises(JaxftError, match=r"eval\.jsonl: format 'prompt_completion' needs columns "
                                         r"\['completion', 'prompt'\] but found \['text'\]"):
        build(config(str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl")), tok)


def test_empty_dataset(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(JaxftError, match=r"empty\.jsonl: no rows \(the dataset is empty\)$"):
        build(config(str(path)), tok)
    csv = tmp_path / "empty.csv"
    csv.write_text("text,label\n")
    with pytest.raises(JaxftError, match=r"empty\.csv: no rows \(the dataset is empty\)$"):
        build(config(str(csv)), tok)
    path.write_text("{oops\n")
    with pytest.raises(JaxftError, match=r"no rows \(the dataset is empty, 1 malformed rows "):
        build(config(str(path), skip_bad_rows=True), tok)


def test_every_example_too_long_and_dropped(tok):
    with pytest.raises(JaxftError) as err:
        build(config(FAQ, max_len=8, overlong="drop"), tok)
    assert str(err.value) == (f"{FAQ}: all 27 usable examples are longer than max_len=8 and "
                              "data.overlong='drop' removed them; raise data.max_len or set "
                              "data.overlong='truncate'")


def test_hub_name_that_cannot_load(tok):
    with pytest.raises(JaxftError, match=r"^'no-such-user-xyz/no-such-dataset' is not a local file "
                                         r"and could not be loaded from the Hugging Face hub"):
        build(config("no-such-user-xyz/no-such-dataset"), tok)


def test_missing_train_path(tok):
    with pytest.raises(JaxftError, match="data.train_path is not set"):
        data.build_data(data.default_config(), tok, global_batch_size=2)


def test_directory_copy_of_sample_data(tok, tmp_path):
    shutil.copy(SUPPORT_CHAT, tmp_path / "chat.jsonl")
    bundle = build(config(str(tmp_path), max_len=128), tok)
    assert bundle.format == "messages" and os.path.exists(tmp_path / "chat.jsonl")
