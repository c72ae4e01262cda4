"""Weights & Biases: an offline run holds what metrics.jsonl holds, read back from W&B's file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from jaxft import spec, train
from jaxft.errors import JaxftError
from tests.tiny_run import read_metrics, tiny_config, tiny_model_dir

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK = 32768  # W&B's transaction log is LevelDB's log format: 32 KiB blocks of framed chunks


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of an offline run's `.wandb` file, parsed with W&B's own protobuf schema."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, offset = [], b"", 7  # ':W&B', magic 0xBEE1, version
    while offset + 7 <= len(data):
        if _BLOCK - offset % _BLOCK < 7:  # a block's tail too short for a header is padding
            offset += _BLOCK - offset % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(records) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                     for i in r.history.item}
            rows[int(items["_step"])] = items
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("wandb") / "model")


def _config(model_dir, workdir, **overrides):
    return tiny_config(model_dir, workdir, **{
        "logging.wandb.project": "jaxft-tests", "logging.wandb.mode": "offline",
        "logging.wandb.tags": "tiny,offline", "train.eval_every": 2,
        "train.sample_prompts": "How do I reset my password?", "train.sample_tokens": 4,
        **overrides})


@pytest.mark.slow
def test_an_offline_run_logs_what_metrics_jsonl_logs(model_dir, tmp_path, monkeypatch) -> None:
    """Preempted at step 2 and resumed: one W&B run (one id, two log files) holding every
    number of every metrics.jsonl line at its step, the sample tables, the config and the
    final metrics as its summary."""
    workdir = tmp_path / "run"
    monkeypatch.setattr(train.Preemption, "at_step", lambda self, step, reading: step == 2)
    assert train.run(_config(model_dir, workdir))["preempted"]
    monkeypatch.undo()
    final = train.run(_config(model_dir, workdir))
    run_id = json.loads((workdir / "wandb_run.json").read_text())["id"]
    files = sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {p.name for p in files} == {f"run-{run_id}.wandb"}
    logs = [read_wandb_records(p) for p in files]
    assert max(_history(logs[0])) == 2 and min(_history(logs[1])) == 3
    for records in logs:
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_id, run.project, run.display_name, list(run.tags)) == (
            run_id, "jaxft-tests", "run", ["tiny", "offline"])
    history = {**_history(logs[0]), **_history(logs[1])}
    tables = {step: p.parent for p in files for step in _history(read_wandb_records(p))}
    for line in read_metrics(workdir):  # every number of every line, at its step
        for key, value in line.items():
            if key not in ("step", "time", "samples") and isinstance(value, (int, float)):
                assert history[line["step"]][key] == pytest.approx(value, rel=1e-12), key
        if "samples" in line:  # the greedy samples, as a table file beside the log
            row = history[line["step"]]
            assert row["samples/_type"] == "table-file"
            table = json.loads((tables[line["step"]] / "files" / row["samples/path"])
                               .read_text())
            assert table["columns"] == ["prompt", "completion"]
            assert table["data"] == [[s["prompt"], s["completion"]] for s in line["samples"]]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["optim"]["lr"] == 3e-3 and config["lora"]["rank"] == 4
    summary = {}  # the updates in order: the last value of each key stands
    for r in logs[1]:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                            for i in r.summary.update})
    for key in ("eval_loss", "train_loss", "base_eval_loss", "step"):
        assert summary[key] == pytest.approx(final[key], rel=1e-12), key


@pytest.mark.parametrize(("overrides", "message"), [
    ({"logging.wandb.mode": "cloud"}, "logging.wandb.mode 'cloud' is not one of"),
])
def test_bad_wandb_settings_are_one_line(model_dir, tmp_path, overrides, message) -> None:
    with pytest.raises(JaxftError, match=message):
        spec.validate(_config(model_dir, tmp_path / "w", **overrides), device_count=1)


def test_wandb_missing_is_refused_before_any_work(model_dir, tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(JaxftError, match="wandb is not installed .*jaxft\\[wandb\\]"):
        train.run(_config(model_dir, tmp_path / "w"))
    assert not (tmp_path / "w").exists()

