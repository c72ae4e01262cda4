"""Two processes (gloo collectives on 127.0.0.1) train on one global mesh like one process."""

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxft import train
from tests.tiny_run import (
    REPO,
    read_metrics,
    subprocess_env,
    tiny_config,
    tiny_model_dir,
    train_losses,
    write_config_file,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", num_key_value_heads=2)


def test_two_processes_match_one_process(model_dir, tmp_path):
    overrides = {"train.steps": 4, "lora.enabled": False, "optim.lr": 1e-3,
                 "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.eval_fraction": 0.0,
                 "checkpoint.every": 2, "train.sample_prompts": ("Where is my order?",),
                 "train.sample_tokens": 6}
    train.run(tiny_config(model_dir, tmp_path / "single", **overrides))
    expected = train_losses(tmp_path / "single")

    workdir = tmp_path / "multi"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **overrides)
    run_two_processes(config)
    got = train_losses(workdir)
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(expected)], rtol=1e-4)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    # Greedy samples from weights sharded over both processes, as one process writes them.
    samples = [[m["step"], m["samples"]] for m in read_metrics(workdir) if "samples" in m]
    assert samples == [[m["step"], m["samples"]] for m in read_metrics(tmp_path / "single")
                       if "samples" in m]
    assert [step for step, _ in samples] == [0, 4]

    # Both processes wrote their shards of checkpoint 2; both restore them and go on alike.
    shutil.rmtree(workdir / "checkpoints" / "4")
    outputs = run_two_processes(config)
    assert all(f"resumed from {workdir / 'checkpoints' / '2'}" in out for out in outputs)
    got = train_losses(workdir)  # the resumed steps 3 and 4 are logged again, last one wins
    np.testing.assert_allclose([got[3], got[4]], [expected[3], expected[4]], rtol=1e-4)


def run_two_processes(config) -> list[str]:
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxft.train", f"--config={config}"], cwd=REPO,
        env=subprocess_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs
