"""Two processes (gloo collectives on 127.0.0.1) train on one global mesh like one process."""

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxft import train
from tests.articles import write_articles
from tests.tiny_run import (
    REPO,
    read_metrics,
    subprocess_env,
    tiny_config,
    tiny_model_dir,
    train_losses,
    write_config_file,
)

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)


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


def test_streamed_corpus_over_two_processes_resumes_exactly(model_dir, tmp_path):
    """data.streaming over two processes: each tokenizes and reads its own half of the shards
    (the hold-out shard both), and a resume from checkpoint 2 trains steps 3 and 4 exactly as
    the uninterrupted run did (each process's stream position saved in the checkpoint)."""
    corpus = write_articles(tmp_path / "corpus.jsonl", 400, mean_sentences=6)
    overrides = {"train.steps": 4, "lora.enabled": False, "optim.lr": 1e-3, "mesh.data": 2,
                 "mesh.fsdp": 4, "checkpoint.every": 2, "data.train_path": str(corpus),
                 "data.streaming": True, "data.shard_mb": 0.02, "data.num_workers": 1,
                 "data.cache_dir": str(tmp_path / "cache"), "train.eval_every": 2}
    workdir = tmp_path / "multi"
    config = write_config_file(tmp_path / "cfg.py", model_dir, workdir, **overrides)
    outputs = run_two_processes(config)
    halves = [int(out.split("of this process's ")[1].split()[0]) for out in outputs]
    shards = int(outputs[0].split("streamed: ")[1].split()[0])
    assert sorted(halves) == [shards // 2, shards - shards // 2]
    expected = train_losses(workdir)
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(workdir) if "eval_loss" in m}
    shutil.rmtree(workdir / "checkpoints" / "4")
    outputs = run_two_processes(config)
    assert all(f"resumed from {workdir / 'checkpoints' / '2'}" in out for out in outputs)
    got = train_losses(workdir)
    assert [got[3], got[4]] == [expected[3], expected[4]]
    assert {m["step"]: m["eval_loss"] for m in read_metrics(workdir) if "eval_loss" in m
            }[4] == evals[4]


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


EXPORT_SCRIPT = """
import sys

import numpy as np
from flax import nnx

import jaxft
from jaxft import export, lora, sharding, train


train.maybe_initialize_distributed()
model_dir, out = sys.argv[1], sys.argv[2]
mesh = sharding.make_mesh(data=1, fsdp=-1)  # every parameter split over all devices
model = jaxft.from_pretrained(model_dir, mesh=mesh)
cfg = lora.LoraConfig(rank=4, targets="all-linear")
lora.apply_lora(model, cfg, seed=3)
rng = np.random.RandomState(0)
for _, linear in lora.linear_modules(model):
    if linear.adapter is not None:
        b = linear.adapter.lora_b
        b[...] = rng.normal(0, 0.1, b.shape).astype(np.float32)
factors = nnx.state(model, nnx.LoRAParam)
nnx.update(model, sharding.put_state(factors, sharding.state_shardings(factors, mesh)))
export.export_model(model, cfg, out + "/adapter")
export.export_model(model, cfg, out + "/merged", merged=True, max_shard_size="20KB")
"""


def test_export_gathers_weights_spread_over_two_processes(model_dir, tmp_path):
    """Adapters and a merged, sharded model from weights split over both processes' devices
    are the files one process writes, tensor for tensor."""
    from safetensors.numpy import load_file

    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "one")],
                            cwd=REPO, env=subprocess_env(8), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "two")], cwd=REPO,
        env=subprocess_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    for kind in ("adapter", "merged"):
        files = sorted(p.name for p in (tmp_path / "one" / kind).glob("*.safetensors"))
        assert files == sorted(p.name for p in (tmp_path / "two" / kind).glob("*.safetensors"))
        assert kind == "adapter" or len(files) > 2  # the merged model really is sharded
        for name in files:
            ours, theirs = (load_file(tmp_path / run / kind / name) for run in ("two", "one"))
            assert sorted(ours) == sorted(theirs)
            for key in ours:
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
