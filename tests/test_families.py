"""The newer families through `jaxft.train`: each learns, and a (2, 2, 2) mesh computes what
one device computes.

Qwen3, Phi-3 (its fused projections sharded), Gemma 2 and Gemma 3 (the norms' (1 + w) and the
soft-caps differentiated), Qwen3-MoE and Mixtral (tokens sorted by expert across the sharded
batch; Mixtral's load-balancing loss in its training loss), fine-tuned in full so every weight
is sharded. Their logits,
generation and PEFT round trips are in test_models, test_generate and test_*_peft.
"""

import subprocess
import sys

import numpy as np
import pytest

from jaxft import train
from tests.tiny_run import REPO, subprocess_env, tiny_config, tiny_model_dir, train_losses

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

STEPS = 6
RUNS = {  # family -> overrides of tests.tiny_run.tiny_config: full fine-tuning, every weight
    # sharded; adapters by each family's PEFT names are in test_generate and test_*_peft
    family: {"lora.enabled": False, "optim.lr": 3e-3}
    for family in ("qwen3_qk_norm_mixed_window", "phi3_longrope_window",
                   "gemma2_softcap_window", "gemma3_local_global_rope", "qwen3_moe_topk_norm",
                   "mixtral_gqa_window")
}
COMMON = {"train.steps": STEPS, "data.eval_fraction": 0.0}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """family -> (model dir, losses of a single-device run), all runs in one child process."""
    root = tmp_path_factory.mktemp("families")
    runs = {}
    for family, overrides in RUNS.items():
        model_dir = tiny_model_dir(root / family / "model", family)
        runs[family] = (model_dir, root / family / "one-device", {**COMMON, **overrides})
    script = "\n".join(
        ["from pathlib import Path", "from jaxft import train",
         "from tests.tiny_run import tiny_config"]
        + [f"train.run(tiny_config(Path({str(m)!r}), Path({str(w)!r}), **{o!r}))"
           for m, w, o in runs.values()])
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO,
                   env=subprocess_env(1), capture_output=True)
    return {family: (m, train_losses(w)) for family, (m, w, _) in runs.items()}


@pytest.mark.parametrize("family", sorted(RUNS))
def test_family_learns_and_shards_exactly(family, one_device, tmp_path):
    model_dir, expected = one_device[family]
    steps = sorted(expected)
    assert steps == list(range(1, STEPS + 1))
    first, last = expected[steps[0]], np.mean([expected[s] for s in steps[-2:]])
    assert last < first - 0.1, f"{family}: train loss {first:.3f} -> {last:.3f}"
    workdir = tmp_path / "mesh-2x2x2"
    train.run(tiny_config(model_dir, workdir, **COMMON, **RUNS[family],
                          **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    got = train_losses(workdir)
    np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps],
                               rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe_topk_norm", "mixtral_gqa_window"])
def test_expert_parallel_mesh_equals_one_device(family, one_device, tmp_path):
    """Experts split over mesh.expert=2 (beside fsdp and tensor, and rows over fsdp×expert):
    the losses of the single-device run."""
    model_dir, expected = one_device[family]
    workdir = tmp_path / "mesh-expert"
    train.run(tiny_config(model_dir, workdir, **COMMON, **RUNS[family], **{
        "mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 2, "mesh.tensor": 2}))
    got = train_losses(workdir)
    steps = sorted(expected)
    np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps],
                               rtol=1e-4)
