"""Early stopping: a run that overfits stops on its own, keeps its best eval's weights apart from
the checkpoint rotation, and counts its patience on across a resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jaxft import evaluate as E
from jaxft import export, spec, train
from jaxft.errors import JaxftError
from jaxft.workdir import load_run
from tests.tiny_run import read_metrics, tiny_config, tiny_model_dir

PATIENCE = 2


def _overfitting(model_dir, workdir, **overrides):
    """Full fine-tuning of a tiny model at a high, constant rate: the eval loss turns up."""
    return tiny_config(model_dir, workdir, **{
        "lora.enabled": False, "optim.lr": 1e-2, "optim.schedule": "constant",
        "train.steps": 30, "train.eval_every": 2, "checkpoint.every": 2, "checkpoint.keep": 1,
        "train.early_stopping.enabled": True, "train.early_stopping.patience": PATIENCE,
        "train.early_stopping.min_delta": 1e-3, **overrides})


def _evals(workdir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(workdir)
            if "eval_loss" in r and r["step"] > 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("early") / "model")


@pytest.fixture(scope="module")
def stopped(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("early") / "run"
    return workdir, train.run(_overfitting(model_dir, workdir))


def test_the_run_stops_after_patience_evals_without_improvement(stopped) -> None:
    workdir, final = stopped
    evals = _evals(workdir)
    best_step, best, bad = None, None, 0  # the rule, replayed on the logged eval losses
    for step, loss in sorted(evals.items()):
        if best is None or loss < best - 1e-3:
            best_step, best, bad = step, loss, 0
        else:
            bad += 1
        if bad == PATIENCE:
            break
    assert bad == PATIENCE, f"the eval loss never turned up: {evals}"
    assert final["step"] == step == max(evals) < 30
    assert final["best_step"] == best_step and final["best_eval_loss"] == best
    assert final["stopped"] == (f"early stopping: eval_loss did not improve by more than 0.001 "
                                f"in {PATIENCE} evals after step {best_step}")
    # the rotation keeps one checkpoint, the last; the best is kept apart from it
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [str(step)]
    assert [p.name for p in (workdir / "best_checkpoint").iterdir()
            if p.name.isdigit()] == [str(best_step)]


def test_step_best_reloads_the_weights_of_the_best_eval(stopped) -> None:
    workdir, final = stopped
    again = E.run(None, str(workdir), step="best")
    assert again["loss"] == pytest.approx(final["best_eval_loss"], rel=1e-6)
    assert load_run(workdir, "best").step == final["best_step"]
    newest = E.run(None, str(workdir))
    assert newest["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert newest["loss"] > again["loss"]


def test_export_of_the_best_step(stopped, tmp_path) -> None:
    workdir, final = stopped
    out = export.export_workdir(workdir, tmp_path / "best", step="best")
    assert (out / "model.safetensors").is_file()
    with pytest.raises(JaxftError, match="--step 'last' is not a step number or 'best'"):
        export.export_workdir(workdir, tmp_path / "x", step="last")


def test_generation_from_the_best_step(stopped) -> None:
    """`jaxft.generate --workdir=W --step=best` generates with the best eval's weights."""
    from jaxft import generate as G

    workdir, final = stopped
    best, _ = G.load_model("unused", workdir=str(workdir), step="best")
    newest, _ = G.load_model("unused", workdir=str(workdir))
    expected = load_run(workdir, "best").model
    ids, mask = G.left_pad([[5, 6, 7, 8], [9, 10]], 0)
    np.testing.assert_array_equal(G.generate_ids(best, ids, mask, max_new_tokens=6),
                                  G.generate_ids(expected, ids, mask, max_new_tokens=6))
    assert final["best_step"] != final["step"]
    assert not np.array_equal(np.asarray(best(ids, mask)), np.asarray(newest(ids, mask)))
    with pytest.raises(JaxftError, match="--step picks a checkpoint of a --workdir run"):
        G.load_model("unused", step="best")


def test_a_rerun_of_a_stopped_run_does_not_train_on(stopped, model_dir) -> None:
    workdir, final = stopped
    assert train.run(_overfitting(model_dir, workdir)) == final


@pytest.mark.slow
def test_a_resumed_run_counts_its_patience_on(model_dir, stopped, tmp_path, monkeypatch) -> None:
    """Preempted between its best eval and its stop, the resumed run stops at the same step
    with the same best, and every eval equals the uninterrupted run's bitwise."""
    straight, final = stopped
    best_step = final["best_step"]
    workdir = tmp_path / "resumed"
    preempt_at = best_step + 2  # one eval without improvement behind it
    monkeypatch.setattr(train.Preemption, "at_step",
                        lambda self, step, reading: step == preempt_at)
    assert train.run(_overfitting(model_dir, workdir))["preempted"]
    monkeypatch.undo()
    resumed = train.run(_overfitting(model_dir, workdir))
    timing = ("tokens_per_s",)  # wall-clock, not state
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in final.items() if k not in timing}
    assert _evals(workdir) == _evals(straight)


def test_no_best_checkpoint_without_early_stopping(stopped, tmp_path) -> None:
    workdir, _ = stopped
    plain = tmp_path / "run"  # a run's config and checkpoints, but no best checkpoint
    shutil.copytree(workdir, plain, ignore=shutil.ignore_patterns("best_checkpoint"))
    with pytest.raises(JaxftError, match="no best checkpoint.*early_stopping.enabled"):
        load_run(plain, "best")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.early_stopping.patience": 0}, "patience must be a positive number of evals, got 0"),
    ({"train.early_stopping.patience": -1}, "patience must be a positive number"),
    ({"train.early_stopping.min_delta": -0.1}, "min_delta must be >= 0, got -0.1"),
    ({"train.eval_every": 0}, "needs evals during the run: set train.eval_every"),
])
def test_bad_settings_are_one_line(model_dir, tmp_path, overrides, message) -> None:
    cfg = _overfitting(model_dir, tmp_path, **overrides)
    with pytest.raises(JaxftError, match=message):
        spec.validate(cfg, device_count=1)
    assert not any(tmp_path.iterdir())


def test_the_tracker_is_json_and_round_trips() -> None:
    from jaxft.early_stopping import EarlyStopping

    tracker = EarlyStopping(2, 0.0, "eval_accuracy", "max")
    assert tracker.update(2, {"eval_accuracy": 0.5})
    assert not tracker.update(4, {"eval_accuracy": 0.5})
    assert not tracker.update(6, {"eval_accuracy": float(np.nan)})
    assert tracker.should_stop and tracker.stopped_at == 6
    copy = EarlyStopping(2, 0.0, "eval_accuracy", "max", **tracker.state())
    assert copy == tracker
