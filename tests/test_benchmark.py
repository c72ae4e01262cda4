"""tools/benchmark.py runs end to end on a tiny shape and writes rows a plot or CI can read.

A smoke test only: no timing is asserted (this machine's load decides timings).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (see the README: the -m 'not slow' lane)

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--modes", "lora,full",
         "--profile", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jaxft/torch tokens/s" in proc.stdout and "profile, jaxft lora" in proc.stdout
    rows = json.loads(out.read_text())
    peaks = [r for r in rows if r["mode"] == "peak_matmul"]
    assert {r["impl"] for r in peaks} == {"jax", "torch"}
    steps = [r for r in rows if r["mode"] != "peak_matmul"]
    assert {(r["impl"], r["mode"]) for r in steps} == {
        (i, m) for i in ("jaxft", "torch") for m in ("lora", "full")}
    for r in steps:
        for field in ("tokens_per_s", "mfu", "peak_rss_mb", "hidden", "layers", "batch", "seq",
                      "threads"):
            assert r[field] > 0, (r["impl"], r["mode"], field)
        assert (r["compile_s"] > 0) if r["impl"] == "jaxft" else r["compile_s"] is None
        assert len(r["step_times"]) == 1  # --quick: one timed step
    jaxft_lora = next(r for r in steps if r["impl"] == "jaxft" and r["mode"] == "lora")
    assert jaxft_lora["xla_temp_mb"] >= 0 and jaxft_lora["profile"]["top_ops"]
    # The same model FLOPs per token in both implementations, and LoRA's below full's.
    flops = {(r["impl"], r["mode"]): r["model_flops"] for r in steps}
    assert flops["jaxft", "lora"] == flops["torch", "lora"] < flops["jaxft", "full"]
    # ...and that count (jaxft's FLOPs model, the dry run's) is what PyTorch's own FLOP counter
    # sees in a forward and backward of the same model under PEFT.
    for mode in ("lora", "full"):
        counted = next(r["counted_flops"] for r in steps if r["impl"] == "torch"
                       and r["mode"] == mode)
        assert flops["jaxft", mode] == counted, mode


def test_readme_tpu_table_is_the_tools_output_of_its_json():
    """The README's "will it fit on a TPU" table is `tools/tpu_fit.py`'s rendering of
    benchmarks/tpu_fit.json, so neither can drift from the other."""
    sys.path.insert(0, str(ROOT / "tools"))
    import tpu_fit

    rows = json.loads((ROOT / "benchmarks" / "tpu_fit.json").read_text())
    assert {(r["model"], r["mode"]) for r in rows} >= {
        ("Llama-3.2-1B", "lora"), ("Llama-3.2-1B", "full"), ("Llama-3.1-8B", "lora"),
        ("Llama-3.1-8B", "full"), ("Llama-3.1-70B", "lora")}
    readme = (ROOT / "README.md").read_text()
    table = readme.split(tpu_fit.README_BEGIN + "\n")[1].split("\n" + tpu_fit.README_END)[0]
    assert table == tpu_fit.markdown(rows)


def test_quick_grpo_benchmark_times_both_rollouts_and_steps(tmp_path):
    """`tools/benchmark.py --grpo` at its tiny shape: both implementations train GRPO steps and
    report positive rollout and train throughputs, generation inside each step's time."""
    out = tmp_path / "grpo.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--grpo", "--quick", "--json",
         str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jaxft/TRL: rollout tokens/s" in proc.stdout
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"jaxft", "trl"}
    for r in rows.values():
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
        assert 0 < r["generation_s"] < r["step_s"] and r["timed_steps"] >= 1


def test_quick_data_benchmark_writes_json_rows(tmp_path):
    """tools/benchmark_data.py --quick: both preparations of 2,000 generated articles, in their
    own processes; both count the same tokens (the same tokenizer, the same EOS), and jaxft's
    first batch comes before its last shard is tokenized or at once after."""
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark_data.py"), "--quick",
         "--corpus-dir", str(tmp_path / "articles"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"jaxft", "peer"}
    assert rows["jaxft"]["tokens"] == rows["peer"]["tokens"] > 2_000_000
    for r in rows.values():
        for field in ("first_batch_s", "tokens_per_s", "main_peak_rss_mb", "tree_peak_rss_mb",
                      "rows"):
            assert r[field] > 0, (r["impl"], field)
    assert rows["jaxft"]["first_batch_s"] <= rows["jaxft"]["tokenized_s"]
