"""A classifier's label names, from its run to the user: the exported model names its classes
as the run did, so transformers' pipeline answers with them, and agrees with jaxft; new data,
labelled, is evaluated with the run's own label map and without its train file; and
`--predictions` labels new rows, labelled or not, as that pipeline does.

One real run of `jaxft.train.run` (LoRA on a tiny random BERT, the head in full, four labels
from the sample support tickets) is shared by every test.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

import jaxft
from jaxft import data, evaluate, export, train, workdir
from jaxft.workdir import load_run
from tests.test_bad_inputs import cli, last_error_line
from tests.test_data_helpers import TICKETS, write_jsonl
from tests.tiny_run import tiny_config, tiny_model_dir

LABELS = {"account": 0, "billing": 1, "shipping": 2, "technical": 3}  # sorted names, as built
TEXTS = ["I was charged twice for my order, please refund one",
         "My parcel has not arrived after two weeks",
         "I cannot log in to my account since yesterday",
         "The app crashes every time I open the settings",
         "Where is my package? The tracking page shows nothing",
         "Please change the email address on my profile"]

# New labelled rows with only two of the run's four labels, "technical" first: a label map built
# from this file would call them 0 and 1, where the run's head has them at 3 and 2.
NEW = [{"text": TEXTS[3], "label": "technical"}, {"text": TEXTS[1], "label": "shipping"},
       {"text": TEXTS[4], "label": "shipping"}, {"text": TEXTS[0], "label": "technical"},
       {"text": TEXTS[5], "label": "technical"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Thirty steps: enough for the head to tell some tickets apart, so predictions differ."""
    root = tmp_path_factory.mktemp("classifier")
    model_dir = tiny_model_dir(root / "bert", "bert")
    train.run(tiny_config(model_dir, root / "run", **{
        "task": "classification", "data.train_path": TICKETS, "data.eval_fraction": 0.3,
        "lora.targets": ("query", "value"), "lora.modules_to_save": ("classifier",),
        "train.steps": 30, "optim.lr": 1e-2}))
    return root / "run"


def jaxft_probabilities(run_dir: Path, texts: list[str]) -> np.ndarray:
    """Class probabilities [N, C] of the run's model (its newest checkpoint) for `texts`."""
    run = load_run(run_dir)
    enc = data.load_tokenizer(run.base)(texts, padding=True, return_token_type_ids=True,
                                        return_tensors="np")
    logits = run.model(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                       jnp.asarray(enc["token_type_ids"]))
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def names_of(probabilities: np.ndarray) -> list[str]:
    by_id = {i: name for name, i in LABELS.items()}
    return [by_id[int(i)] for i in probabilities.argmax(-1)]


def assert_pipeline_agrees(classify, run_dir: Path) -> None:
    """The pipeline's label for each text is the one jaxft predicts, with its probability."""
    expected = jaxft_probabilities(run_dir, TEXTS)
    answers = classify(TEXTS)
    assert [a["label"] for a in answers] == names_of(expected)
    np.testing.assert_allclose([a["score"] for a in answers], expected.max(-1), atol=1e-4)


def test_run_saved_the_label_map_it_trained_with(run_dir):
    assert json.loads((run_dir / "label_map.json").read_text()) == LABELS
    assert load_run(run_dir).label_map == LABELS
    assert len(set(names_of(jaxft_probabilities(run_dir, TEXTS)))) > 1  # a test with teeth


def test_merged_export_names_the_runs_labels(run_dir, tmp_path):
    """config.json carries id2label/label2id as transformers writes them, and a text
    classification pipeline over the export answers with the run's names."""
    out = export.export_workdir(run_dir, tmp_path / "merged", merged=True)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for name, i in LABELS.items()}
    assert config["label2id"] == LABELS
    assert transformers.AutoConfig.from_pretrained(out).id2label == {
        i: name for name, i in LABELS.items()}
    assert_pipeline_agrees(transformers.pipeline("text-classification", model=str(out),
                                                 device="cpu"), run_dir)


def test_adapter_export_load_line_names_the_runs_labels(run_dir, tmp_path):
    """PEFT's adapter_config.json has no field for label names (it names only the base), so the
    line the export prints passes them to the base model; run as printed, it classifies as jaxft
    does, by name."""
    out = export.export_workdir(run_dir, tmp_path / "adapter")
    said = export._describe(out, run_dir)
    line = said.split("load it with ", 1)[1]
    assert "id2label={0: 'account', 1: 'billing', 2: 'shipping', 3: 'technical'}" in line
    model = eval(line, {"PeftModel": peft.PeftModel,  # noqa: S307 - the line jaxft printed
                        "AutoModelForSequenceClassification":
                            transformers.AutoModelForSequenceClassification}).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    classify = transformers.pipeline("text-classification", model=model.merge_and_unload(),
                                     tokenizer=tokenizer, device="cpu")
    assert_pipeline_agrees(classify, run_dir)


def test_label_names_that_do_not_fit_the_head_are_refused_in_one_line():
    from jaxft.errors import JaxftError
    from jaxft.hf import weights

    with pytest.raises(JaxftError, match=r"^label 'refunds' has id 4, outside the classifier's "
                       r"4 classes \(ids 0 to 3\)$"):
        weights.label_fields({**LABELS, "refunds": 4}, 4)
    with pytest.raises(JaxftError, match="^label names apply to a sequence classifier"):
        weights.label_fields(LABELS, None)
    partial = weights.label_fields({"billing": 1}, 3)  # ids nobody named keep transformers' own
    assert partial["id2label"] == {"0": "LABEL_0", "1": "billing", "2": "LABEL_2"}


# ------------------------------------------------------------------------------------------------
# New data: evaluated with the run's label map, without the run's train file
# ------------------------------------------------------------------------------------------------


def without_train_file(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run whose train file is gone, as it is on another machine."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["train_path"] = str(tmp_path / "gone.csv")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_new_labelled_file_evaluates_without_the_train_file(run_dir, tmp_path):
    """--eval_path (or a config's data.eval_path, no train file named) alone: the metrics are
    those of the run's model over the new rows, labels read with the run's label map."""
    run = without_train_file(run_dir, tmp_path)
    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    probabilities = jaxft_probabilities(run_dir, [r["text"] for r in NEW])
    expected = evaluate.classification_metrics(np.log(probabilities),
                                                np.array([LABELS[r["label"]] for r in NEW]))
    config = tiny_config(Path("unused"), run, **{"data.train_path": None,
                                                 "data.eval_path": new})
    for got in (evaluate.run(None, str(run), eval_path=new), evaluate.run(config, str(run))):
        assert got["count"] == len(NEW)
        for key in ("loss", "accuracy", "macro_f1"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.parametrize("rows, message", [
    ([NEW[0], {"text": TEXTS[2], "label": "refunds"}],
     "{new} line 2: label 'refunds' is not in the label map (account, billing, shipping, "
     "technical)"),
    ([{"body": TEXTS[0], "label": "billing"}],
     "{new}: cannot detect the data format: found columns ['body', 'label'], expected "
     "['label', 'text'] (set data.format or data.*_column)"),
], ids=["a label the run never saw", "no text column"])
def test_bad_new_data_is_named_in_one_line_before_the_model_loads(run_dir, tmp_path, monkeypatch,
                                                                   rows, message):
    new = write_jsonl(tmp_path / "new.jsonl", rows)

    def not_yet(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(workdir, "load_run", not_yet)
    with pytest.raises(jaxft.JaxftError) as e:
        evaluate.run(None, str(run_dir), eval_path=new)
    assert str(e.value) == message.format(new=new)


@pytest.mark.slow
def test_evaluate_cli_names_a_label_the_run_never_saw(run_dir, tmp_path):
    new = write_jsonl(tmp_path / "new.jsonl", [NEW[0], {"text": TEXTS[2], "label": "refunds"}])
    done = cli("jaxft.evaluate", f"--workdir={run_dir}", f"--eval_path={new}")
    assert last_error_line(done) == (f"error: {new} line 2: label 'refunds' is not in the label "
                                     "map (account, billing, shipping, technical)")


# ------------------------------------------------------------------------------------------------
# Predictions: every row labelled with the run's names, as the exported model labels it
# ------------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def unlabelled_tickets(tmp_path: Path) -> tuple[Path, list[str]]:
    """The 40 sample tickets without their labels, plus a column predictions leave out:
    five batches of eight, the last one whole."""
    texts = [row["text"] for row in read_csv(Path(TICKETS))]
    path = tmp_path / "unlabelled.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ticket", "text"])
        writer.writerows([f"T-{i}", text] for i, text in enumerate(texts))
    return path, texts


def test_predictions_label_unlabelled_rows_as_the_exported_pipeline_does(run_dir, tmp_path):
    new, texts = unlabelled_tickets(tmp_path)
    out = tmp_path / "predicted.csv"
    got = evaluate.run(None, str(run_dir), eval_path=str(new), predictions=out)
    assert got["predicted"] == len(texts) and "loss" not in got  # no labels, no metrics
    written = read_csv(out)
    assert list(written[0]) == ["text", "predicted_label", "probability"]
    assert [row["text"] for row in written] == texts  # as given, in order
    merged = export.export_workdir(run_dir, tmp_path / "merged", merged=True)
    answers = transformers.pipeline("text-classification", model=str(merged),
                                    device="cpu")(texts)
    assert [row["predicted_label"] for row in written] == [a["label"] for a in answers]
    np.testing.assert_allclose([float(row["probability"]) for row in written],
                               [a["score"] for a in answers], atol=1e-4)
    assert len({row["predicted_label"] for row in written}) > 1


def test_predictions_of_labelled_rows_come_with_the_same_metrics(run_dir, tmp_path):
    """A labelled file: its labels are kept as given beside the predictions, and the metrics
    are those of the evaluation without predictions, to the bit."""
    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    out = tmp_path / "predicted.csv"
    got = evaluate.run(None, str(run_dir), eval_path=new, predictions=out)
    plain = evaluate.run(None, str(run_dir), eval_path=new)
    assert {k: got[k] for k in plain} == plain
    written = read_csv(out)
    assert [row["label"] for row in written] == [r["label"] for r in NEW]
    assert [row["predicted_label"] for row in written] == names_of(
        jaxft_probabilities(run_dir, [r["text"] for r in NEW]))


def test_predictions_are_refused_in_one_line_before_the_model_loads(run_dir, tmp_path,
                                                                    monkeypatch):
    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    taken = tmp_path / "taken.csv"
    taken.write_text("keep me\n")
    lm_run = tmp_path / "lm_run"
    lm_run.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    (lm_run / "config.json").write_text(json.dumps({**config, "task": "lm"}))

    def not_yet(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(workdir, "load_run", not_yet)
    for run, out, message in [
        (run_dir, taken, f"{taken}: exists (pass --overwrite, or overwrite=True, to replace it)"),
        (run_dir, tmp_path / "nowhere" / "out.csv",
         f"{tmp_path / 'nowhere' / 'out.csv'}: directory {tmp_path / 'nowhere'} does not exist"),
        (run_dir, tmp_path, f"{tmp_path}: is a directory (expected the path of the predictions "
                            "file to write)"),
        (lm_run, tmp_path / "out.csv", "--predictions labels rows with a classifier's label "
                                       f"names; {lm_run} is a 'lm' run"),
    ]:
        with pytest.raises(jaxft.JaxftError) as e:
            evaluate.run(None, str(run), eval_path=new, predictions=out)
        assert str(e.value) == message
    assert taken.read_text() == "keep me\n"
    with pytest.raises(jaxft.JaxftError, match="^--predictions needs --workdir"):
        evaluate.run(tiny_config(Path("unused"), tmp_path), None, predictions=tmp_path / "o.csv")


def test_a_predictions_file_is_written_whole_or_not_at_all(tmp_path):
    from jaxft import outdir

    out = tmp_path / "predicted.csv"
    out.write_text("the previous file\n")
    with pytest.raises(RuntimeError), outdir.whole_file(out) as temporary:
        temporary.write_text("half a fi")
        raise RuntimeError("the disk filled up")
    assert out.read_text() == "the previous file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predicted.csv"]
    evaluate.write_predictions(out, ["text", "predicted_label"], [["a, b", "billing"]],
                               overwrite=True)
    assert read_csv(out) == [{"text": "a, b", "predicted_label": "billing"}]


@pytest.mark.slow
def test_evaluate_cli_writes_predictions_and_will_not_overwrite_them(run_dir, tmp_path):
    new, texts = unlabelled_tickets(tmp_path)
    out = tmp_path / "predicted.csv"
    args = (f"--workdir={run_dir}", f"--eval_path={new}", f"--predictions={out}")
    done = cli("jaxft.evaluate", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["predicted"] == len(texts) and said["predictions"] == str(out)
    first = out.read_text()
    assert last_error_line(cli("jaxft.evaluate", *args)) == (
        f"error: {out}: exists (pass --overwrite, or overwrite=True, to replace it)")
    assert out.read_text() == first
    assert cli("jaxft.evaluate", *args, "--overwrite").returncode == 0
