"""Nothing saved is lost: a refused run leaves the workdir as it was, a checkpoint is moved aside
only when its files prove it damaged, and `resume=fresh` deletes only what jaxft wrote."""

import json

import jax
import numpy as np
import pytest

import jaxft
from jaxft import checkpoint, export, train
from tests.tiny_run import read_metrics, tiny_config, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def listing(workdir):
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))


@pytest.mark.slow  # (a whole training run: the slow lane)
def test_changed_lora_setup_is_refused_and_leaves_the_run_and_its_export_intact(model_dir,
                                                                              tmp_path):
    """Another LoRA rank, or a quantized base under adapters trained on a 16-bit one (or the
    reverse), is refused by name; the run's record, files and export are as they were; 'never'
    refuses any checkpoint and 'fresh' starts over."""
    workdir = tmp_path / "run"
    train.run(tiny_config(model_dir, workdir, **{"train.steps": 2}))
    record = (workdir / "config.json").read_bytes()
    before = listing(workdir)
    with pytest.raises(jaxft.JaxftError, match=r"checkpoints/2: checkpoint was written by a run "
                       r"with a different lora"):
        train.run(tiny_config(model_dir, workdir, **{"train.steps": 4, "lora.rank": 8}))
    assert (workdir / "config.json").read_bytes() == record
    assert listing(workdir) == before
    with pytest.raises(jaxft.JaxftError, match=r"checkpoints/2: checkpoint was written by a run "
                       r"with a different lora .*'base_quant': 'nf4'"):
        train.run(tiny_config(model_dir, workdir, **{"train.steps": 4, "lora.base_quant": "nf4"}))
    with pytest.raises(jaxft.JaxftError, match="checkpoint.resume is 'never'"):
        train.run(tiny_config(model_dir, workdir, **{"checkpoint.resume": "never"}))
    out = export.export_workdir(workdir, tmp_path / "adapter")  # still the rank-4 run's
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    final = train.run(tiny_config(model_dir, workdir, **{"train.steps": 2, "lora.rank": 8,
                                                         "checkpoint.resume": "fresh"}))
    assert final["step"] == 2


@pytest.mark.slow
def test_changed_optimizer_is_refused_by_name_and_nothing_is_moved(model_dir, tmp_path):
    workdir = tmp_path / "run"
    overrides = {"train.steps": 2, "optim.clip_norm": 1.0}
    train.run(tiny_config(model_dir, workdir, **overrides))
    before = listing(workdir)
    with pytest.raises(jaxft.JaxftError) as e:
        train.run(tiny_config(model_dir, workdir, **{**overrides, "train.steps": 4,
                                                     "optim.clip_norm": 0.0}))
    assert str(e.value) == (
        f"{workdir / 'checkpoints' / '2'}: checkpoint was written by a run with a different "
        "optim.clip_norm ('on' vs now 'off'); use another workdir or "
        "--config.checkpoint.resume=fresh")
    assert listing(workdir) == before and not (workdir / "damaged_checkpoints").exists()
    final = train.run(tiny_config(model_dir, workdir, **{**overrides, "train.steps": 4}))
    assert final["step"] == 4
    assert [m["step"] for m in read_metrics(workdir) if "train_loss" in m] == [1, 2, 3, 4]


def test_a_checkpoint_that_fails_to_restore_with_intact_files_is_not_moved(tmp_path):
    """Whatever makes a restore fail (here a structure the fingerprint did not foresee; an I/O
    or permission error alike), files as saved are not damage: refuse, move nothing."""
    state = {"w": jax.numpy.arange(6.0)}
    fingerprint = dict.fromkeys(checkpoint.FINGERPRINT_FIELDS, "the same run")
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", keep=2, fingerprint=fingerprint)
    ckpts.save(1, state, {})
    ckpts.close()
    reopened = checkpoint.Checkpoints(tmp_path / "checkpoints", keep=2, fingerprint=fingerprint)
    other = checkpoint.abstract_like({"w": jax.numpy.zeros((6,)), "b": jax.numpy.zeros(3)})
    with pytest.raises(jaxft.JaxftError, match=r"checkpoints/1: its state does not restore "
                       r"\(.*\), but its files are as they were saved, so it is not damaged and "
                       r"nothing was moved"):
        reopened.restore_latest(other)
    assert reopened.steps() == [1] and not (tmp_path / "damaged_checkpoints").exists()
    step, restored, _ = reopened.restore_latest(checkpoint.abstract_like(state))
    np.testing.assert_array_equal(restored["w"], state["w"])


@pytest.mark.slow
def test_fresh_deletes_only_what_jaxft_wrote(model_dir, tmp_path):
    workdir = tmp_path / "run"
    train.run(tiny_config(model_dir, workdir, **{"train.steps": 2}))
    (workdir / "my_notes.txt").write_text("keep me")
    (workdir / "data").mkdir()
    (workdir / "data" / "tickets.jsonl").write_text("{}\n")
    train.run(tiny_config(model_dir, workdir, **{"train.steps": 1,
                                                 "checkpoint.resume": "fresh"}))
    assert (workdir / "my_notes.txt").read_text() == "keep me"
    assert (workdir / "data" / "tickets.jsonl").is_file()
    assert [m["step"] for m in read_metrics(workdir) if "train_loss" in m] == [1]  # new run
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


@pytest.mark.parametrize("where", ["a directory of other files", "the current directory"])
def test_fresh_refuses_a_directory_jaxft_did_not_make(where, model_dir, tmp_path, monkeypatch):
    target = tmp_path / "project"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    if where == "the current directory":
        monkeypatch.chdir(target)
        target = type(target)(".")
    cfg = tiny_config(model_dir, target, **{"checkpoint.resume": "fresh"})
    with pytest.raises(jaxft.JaxftError, match=r"checkpoint.resume=fresh deletes only a workdir "
                       r"a jaxft run made, and this one has no \.jaxft-workdir marker"):
        train.run(cfg)
    assert (tmp_path / "project" / "thesis.tex").read_text() == "years of work"
