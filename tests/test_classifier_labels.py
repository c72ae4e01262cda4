"""A classifier's label names, from its run to the user: the exported model names its classes
as the run did, so transformers' pipeline answers with them, and agrees with jaxft.

One real run of `jaxft.train.run` (LoRA on a tiny random BERT, the head in full, four labels
from the sample support tickets) is shared by every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

from jaxft import data, export, train
from jaxft.workdir import load_run
from tests.test_data_helpers import TICKETS
from tests.tiny_run import tiny_config, tiny_model_dir

LABELS = {"account": 0, "billing": 1, "shipping": 2, "technical": 3}  # sorted names, as built
TEXTS = ["I was charged twice for my order, please refund one",
         "My parcel has not arrived after two weeks",
         "I cannot log in to my account since yesterday",
         "The app crashes every time I open the settings",
         "Where is my package? The tracking page shows nothing",
         "Please change the email address on my profile"]


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
