"""Preparing a raw-text corpus for training: jaxft's data.streaming against datasets + TRL.

    python tools/benchmark_data.py                                   # 10^4, 10^5 articles (~6 min)
    python tools/benchmark_data.py --sizes 10000,100000,1000000 --json runs/benchmark_data.json
    python tools/benchmark_data.py --quick                           # smoke run (2,000 articles)

The corpus is `tests/articles.py`'s generated articles (~4.5 KB of prose each, JSON Lines),
written once under --corpus-dir. Both sides get SmolLM2-135M-Instruct's tokenizer (the bundled
GGUF file's, saved as a transformers tokenizer), rows of 2,048 tokens, batches of 32 rows, no
eval split, and the same number of processes (--processes, default every core), each in its
own subprocess with cold caches (a fresh jaxft cache dir and a fresh `datasets` cache):

- jaxft: `data.build_data` with data.streaming (the tokenizing workers start at once), then
  the first batch, then every shard tokenized (`rows_per_epoch` waits for the last), then the
  whole epoch read batch by batch;
- peer: the usual PyTorch-side preparation, `datasets.load_dataset("json")`,
  `.map(tokenize + EOS, batched=True, num_proc=P)`, TRL's `pack_dataset(seq_length=2048,
  strategy="bfd", num_proc=P)`; its first batch is there only when all of that is done; then
  the whole packed set read in batches of 32.

Columns: time to the first batch, tokenizing throughput (corpus tokens / seconds until every
token is tokenized, packed for the peer), time to read the epoch, and peak RSS: of the main
process, and of the whole process tree at once (main plus workers, sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 2048, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="articles per corpus, comma-separated")
    p.add_argument("--processes", type=int, default=0, help="tokenizing processes (0: all cores)")
    p.add_argument("--corpus-dir", default=os.path.join(tempfile.gettempdir(), "jaxft_articles"))
    p.add_argument("--impls", default="jaxft,peer")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--quick", action="store_true", help="2,000 articles: a smoke run")
    p.add_argument("--worker", choices=("jaxft", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class TreeRss:
    """Peak resident memory of this process and its children together, sampled."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_jaxft(args: argparse.Namespace, processes: int) -> dict:
    from jaxft import data
    from jaxft.data import pipeline  # noqa: F401 - imported (with JAX) before the clock starts

    tokenizer = data.load_tokenizer(args.tokenizer)
    cfg = data.default_config()
    cfg.train_path, cfg.streaming, cfg.cache_dir = args.corpus, True, args.scratch
    cfg.max_len, cfg.num_workers, cfg.eval_fraction = SEQ_LEN, processes, 0.0
    rss = TreeRss()
    t0 = time.perf_counter()
    bundle = data.build_data(cfg, tokenizer, global_batch_size=BATCH, task="lm",
                             process_index=0, process_count=1)
    next(bundle.train)
    first = time.perf_counter() - t0
    rows = bundle.train.rows_per_epoch()
    tokenized = time.perf_counter() - t0
    tokens = bundle.streamed.totals()["tokens"]
    bundle.close()
    train = data.build_data(cfg, tokenizer, global_batch_size=BATCH, task="lm",
                            process_index=0, process_count=1).train
    t1 = time.perf_counter()
    for _ in range(rows // BATCH):
        next(train)
    read = time.perf_counter() - t1
    return {"first_batch_s": first, "tokenized_s": tokenized, "tokens": tokens,
            "rows": rows, "epoch_read_s": read, "tree_peak_rss_mb": rss.stop() / 2**20}


def run_peer(args: argparse.Namespace, processes: int) -> dict:
    os.environ["HF_DATASETS_CACHE"] = args.scratch
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    rss = TreeRss()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=args.corpus, split="train",
                               cache_dir=args.scratch)
    ds = ds.map(tokenize, batched=True, num_proc=processes, remove_columns=ds.column_names)
    packed = pack_dataset(ds, seq_length=SEQ_LEN, strategy="bfd",
                          map_kwargs={"num_proc": processes})
    packed.with_format("numpy")[:BATCH]
    first = time.perf_counter() - t0
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
    t1 = time.perf_counter()
    rows = 0
    for batch in packed.with_format("numpy").iter(batch_size=BATCH):
        rows += len(batch["input_ids"])
    read = time.perf_counter() - t1
    return {"first_batch_s": first, "tokenized_s": first, "tokens": tokens, "rows": rows,
            "epoch_read_s": read, "tree_peak_rss_mb": rss.stop() / 2**20}


def worker(args: argparse.Namespace) -> None:
    processes = args.processes or len(os.sched_getaffinity(0))
    row = (run_jaxft if args.worker == "jaxft" else run_peer)(args, processes)
    row["main_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["tokens_per_s"] = row["tokens"] / row["tokenized_s"]
    print(json.dumps(row))


def tokenizer_dir(scratch: Path) -> Path:
    """SmolLM2's tokenizer (read from the bundled GGUF file) as a transformers directory."""
    sys.path.insert(0, str(ROOT))
    from jaxft import data
    from tests.real_weights import smollm2_gguf_path

    out = scratch / "smollm2_tokenizer"
    data.load_tokenizer(smollm2_gguf_path()).save_pretrained(out)
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    from tests.articles import write_articles

    sizes = [2000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    processes = args.processes or len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_dir(Path(tmp))
        print(f"{'articles':>9} {'MB':>6} {'impl':>6} {'first batch s':>13} {'tokens':>12} "
              f"{'tok/s':>10} {'epoch read s':>12} {'RSS main GB':>11} {'RSS tree GB':>11}")
        for size in sizes:
            corpus = Path(args.corpus_dir) / f"articles_{size}.jsonl"
            if not corpus.exists():
                write_articles(corpus.with_suffix(".partial"), size).rename(corpus)
            for impl in args.impls.split(","):
                scratch = Path(tmp) / f"{impl}_{size}"
                scratch.mkdir()
                env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", impl, "--corpus", str(corpus),
                     "--tokenizer", str(tok), "--scratch", str(scratch),
                     "--processes", str(processes)],
                    capture_output=True, text=True, env=env, cwd=ROOT)
                shutil.rmtree(scratch, ignore_errors=True)
                if proc.returncode:
                    raise SystemExit(f"{impl} at {size} articles failed:\n{proc.stderr[-3000:]}")
                row = {"impl": impl, "articles": size, "processes": processes,
                       "corpus_mb": corpus.stat().st_size / 1e6,
                       **json.loads(proc.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"{size:>9,} {row['corpus_mb']:>6.0f} {impl:>6} "
                      f"{row['first_batch_s']:>13.2f} {row['tokens']:>12,} "
                      f"{row['tokens_per_s']:>10,.0f} {row['epoch_read_s']:>12.1f} "
                      f"{row['main_peak_rss_mb'] / 1024:>11.2f} "
                      f"{row['tree_peak_rss_mb'] / 1024:>11.2f}", flush=True)
    for size in sizes:
        pair = {r["impl"]: r for r in rows if r["articles"] == size}
        if len(pair) == 2:
            speed = pair["jaxft"]["tokens_per_s"] / pair["peer"]["tokens_per_s"]
            sooner = pair["peer"]["first_batch_s"] / pair["jaxft"]["first_batch_s"]
            print(f"{size:,} articles: jaxft/peer tokens/s {speed:.2f}x, first batch "
                  f"{sooner:.1f}x sooner")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
