"""The benchmark runs end to end (a tiny shape, one timed step) and writes the rows it promises.

No speed is asserted here: speed targets live in the benchmark's own output.
"""

import json
import subprocess
import sys

from tests.tiny_run import REPO

FIELDS = {"impl", "mode", "tokens_per_s", "mfu", "compile_s", "peak_rss_mb"}


def test_quick_benchmark_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "tools/benchmark.py", "--quick", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text()) if r["mode"] in ("lora", "full")]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        ("jaxft", "lora"), ("jaxft", "full"), ("torch", "lora"), ("torch", "full")}
    for row in rows:
        assert FIELDS <= row.keys() and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert "jaxft/torch tokens/s" in run.stdout
