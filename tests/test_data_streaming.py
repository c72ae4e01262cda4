"""data.streaming: a corpus tokenized by worker processes into an on-disk cache while training
reads it. Checked against transformers' own tokenizer, the in-memory text path's examples, and
itself across worker counts, restarts and a changed tokenizer; bad shards and a full disk."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxft import data
from jaxft.data import encode, formats, sources, stream
from jaxft.errors import JaxftError
from tests.articles import write_articles
from tests.tiny_run import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_articles(tmp_path_factory.mktemp("corpus") / "articles.jsonl", 400,
                          mean_sentences=6)


def cfg_for(path, cache, **overrides):
    cfg = data.default_config()
    cfg.train_path, cfg.streaming, cfg.cache_dir = str(path), True, str(cache)
    cfg.shard_mb, cfg.max_len, cfg.num_workers = 0.05, 64, 2
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def build(cfg, tok, batch=4):
    return data.build_data(cfg, tok, global_batch_size=batch, task="lm", process_index=0,
                           process_count=1)


def batches(bundle, n):
    return [next(bundle.train) for _ in range(n)]


def cached_documents(bundle) -> list[list[int]]:
    corpus, out = bundle.streamed, []
    for i in range(len(corpus.shards)):
        for part in ("eval", "") if i == corpus.holdout_shard else ("",):
            docs = corpus.documents(i, part)
            if docs is not None:
                out += [docs.tokens[a:b].tolist() for a, b in
                        zip(docs.offsets[:-1], docs.offsets[1:], strict=True)]
    return out


def test_tokens_are_the_tokenizers_own(corpus, tok, tmp_path):
    """Every document is transformers' encoding of its text plus EOS, and none is lost: the
    shards' byte ranges cover every line exactly once."""
    bundle = build(cfg_for(corpus, tmp_path), tok)
    assert len(bundle.streamed.shards) > 5
    got = Counter(map(tuple, cached_documents(bundle)))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    want = Counter(tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts)
    assert got == want
    bundle.close()


def test_an_epoch_holds_the_in_memory_paths_examples(corpus, tok, tmp_path):
    """One epoch of streamed rows trains exactly the examples the in-memory text format cuts
    from the same documents (pieces of max_len overlapping by one), each once."""
    cfg = cfg_for(corpus, tmp_path, eval_fraction=0.0)
    bundle = build(cfg, tok)
    rows = bundle.train.rows_per_epoch()
    seen = Counter()
    for batch in batches(bundle, rows // 4):
        for r in range(4):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                seen[tuple(batch["input_ids"][r][seg == s].tolist())] += 1
    loaded = sources.load_split(str(corpus), None, eval_fraction=0.0, seed=0,
                                skip_bad_rows=False, text_column="text").train
    in_memory = data.default_config()
    in_memory.max_len = 64
    schema = formats.resolve(in_memory, ["text"], "lm", "x")
    examples, _ = encode.encode(loaded, schema, tok, in_memory)
    want = Counter(tuple(examples.tokens[a:b].tolist())
                   for a, b in zip(examples.offsets[:-1], examples.offsets[1:], strict=True))
    # the last batch may be short of an epoch's end by < 4 rows
    missing = want - seen
    assert sum(missing.values()) <= 4 * 8 and not (seen - want)
    bundle.close()


def test_order_depends_on_the_seed_alone(corpus, tok, tmp_path):
    """One worker or three, a cold cache or a warm one: the same batches, bit for bit."""
    one = build(cfg_for(corpus, tmp_path / "a", num_workers=1), tok)
    three = build(cfg_for(corpus, tmp_path / "b", num_workers=3), tok)
    warm = build(cfg_for(corpus, tmp_path / "a", num_workers=1), tok)
    assert warm.streamed.cached == len(warm.streamed.shards) and warm.streamed.pool is None
    for x, y, z in zip(batches(one, 40), batches(three, 40), batches(warm, 40), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            np.testing.assert_array_equal(x[k], z[k])
    other = build(cfg_for(corpus, tmp_path / "a", seed=1), tok)
    assert not np.array_equal(next(other.train)["input_ids"], next(warm.train)["input_ids"])
    for b in (one, three, warm, other):
        b.close()


def test_resume_from_state_is_exact(corpus, tok, tmp_path):
    """get_state after 37 batches (into the second epoch), set on a new run: the same next
    batches as the run that went on."""
    straight = build(cfg_for(corpus, tmp_path), tok)
    rows = straight.train.rows_per_epoch()
    k = rows // 4 + 5
    batches(straight, k)
    state = json.loads(json.dumps(straight.train.get_state()))
    assert state["epoch"] == 1
    want = batches(straight, 10)
    resumed = build(cfg_for(corpus, tmp_path), tok)
    resumed.train.set_state(state)
    for x, y in zip(want, batches(resumed, 10), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(JaxftError, match="shards"):
        resumed.train.set_state({**state, "shards": 3})
    straight.close(), resumed.close()


def test_another_tokenizer_rebuilds_the_cache(corpus, tok, tmp_path):
    """A cache written by one tokenizer is never read for another: the second run's tokens
    are its own tokenizer's."""
    build(cfg_for(corpus, tmp_path), tok).close()
    from transformers import PreTrainedTokenizerFast
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    bundle = build(cfg_for(corpus, tmp_path), other)
    assert bundle.streamed.cached == 0
    first = json.loads(corpus.read_text().splitlines()[0])["text"]
    docs = cached_documents(bundle)
    assert other(first)["input_ids"] + [other.eos_token_id] in docs
    bundle.close()


def test_unreadable_shard_is_named_or_skipped(tmp_path, tok):
    """A corrupt .jsonl.gz among good ones: the run stops naming it, or with
    data.skip_bad_rows goes on without it and counts it."""
    root = tmp_path / "shards"
    root.mkdir()
    for i in range(4):
        lines = [json.dumps({"text": f"document {i} {j} " * 20}) for j in range(30)]
        (root / f"part-{i}.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    (root / "part-2.jsonl.gz").write_bytes(b"\x1f\x8b\x08 not gzip at all")
    cfg = cfg_for(str(root / "*.jsonl.gz"), tmp_path / "cache", eval_fraction=0.0)
    bundle = build(cfg, tok)
    with pytest.raises(JaxftError, match=r"part-2\.jsonl\.gz: cannot read"):
        bundle.train.rows_per_epoch()
    cfg.skip_bad_rows = True
    bundle = build(cfg, tok)
    assert bundle.train.rows_per_epoch() > 0
    assert bundle.streamed.totals()["unreadable_shards"] == 1


def test_bad_line_is_named_with_its_line_number(tmp_path, tok):
    """A malformed line deep in a shard that starts mid-file is named by its file line."""
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"line {i} " * 30}) for i in range(300)]
    lines[250] = '{"text": "broken'
    path.write_text("\n".join(lines) + "\n")
    bundle = build(cfg_for(path, tmp_path / "cache", eval_fraction=0.0), tok)
    with pytest.raises(JaxftError, match=rf"{path} line 251: malformed JSON"):
        bundle.train.rows_per_epoch()
    bundle = build(cfg_for(path, tmp_path / "cache", eval_fraction=0.0, skip_bad_rows=True), tok)
    bundle.train.rows_per_epoch()
    assert bundle.streamed.totals()["skipped_bad_rows"] == 1


def test_text_trees_and_parquet(tmp_path, tok):
    """A tree of code files is one document a file; parquet shards by row groups."""
    tree = tmp_path / "repo"
    (tree / "pkg" / ".git").mkdir(parents=True)
    (tree / "pkg" / ".git" / "HEAD").write_text("ignored")
    texts = {}
    for i in range(12):
        f = tree / "pkg" / f"mod{i}.py"
        texts[f] = f"def f{i}(x):\n\n    return x + {i}\n"
        f.write_text(texts[f])
    bundle = build(cfg_for(tree, tmp_path / "c1", eval_fraction=0.0), tok)
    want = Counter(tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts.values())
    assert Counter(map(tuple, cached_documents(bundle))) == want
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [f"row {i} " * 40 for i in range(200)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "c.parquet", row_group_size=20)
    bundle = build(cfg_for(tmp_path / "c.parquet", tmp_path / "c2", eval_fraction=0.0,
                           shard_mb=0.01), tok)
    assert len(bundle.streamed.shards) > 2
    want = Counter(tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in rows)
    assert Counter(map(tuple, cached_documents(bundle))) == want


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from jaxft import data
from jaxft.errors import JaxftError
from tests.test_data_streaming import cfg_for
tok = data.load_tokenizer(sys.argv[1])
cfg = cfg_for(sys.argv[2], sys.argv[3], eval_fraction=0.0, shard_mb=0.2)
bundle = data.build_data(cfg, tok, global_batch_size=4, task="lm", process_index=0,
                         process_count=1)
try:
    bundle.train.rows_per_epoch()
except JaxftError as e:
    print("ERROR", e)
"""


def test_full_disk_is_one_line_and_leaves_nothing_to_reuse(corpus, tok, tmp_path):
    """Writing the cache past a file-size limit (the disk refusing bytes): one line naming the
    cache; no shard file is left half-written, and the next run's tokens are whole."""
    tok.save_pretrained(tmp_path / "tok")
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "tok"), str(corpus),
                          str(cache)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = next(x for x in out.stdout.splitlines() if x.startswith("ERROR"))
    assert "no room to write the tokenized corpus" in line and str(cache) in line, out
    assert not list(cache.rglob("*.tmp*"))
    bundle = build(cfg_for(corpus, cache, eval_fraction=0.0, shard_mb=0.2), tok)
    texts = [json.loads(x)["text"] for x in corpus.read_text().splitlines()]
    want = Counter(tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts)
    assert Counter(map(tuple, cached_documents(bundle))) == want
    bundle.close()


def test_pieces_match_the_in_memory_cut():
    """pieces(): the cut encode's text format makes, from lengths alone."""
    lengths = np.array([1, 2, 5, 9, 64, 65, 200])
    docs = stream.token_cache.ShardTokens(np.zeros(lengths.sum(), np.uint16),
                                          np.concatenate([[0], np.cumsum(lengths)]))
    starts, sizes = stream.pieces(docs, 8)
    want = []
    for d, n in enumerate(lengths):
        if n < 2:
            continue
        want += [(docs.offsets[d] + s, min(8, n - s)) for s in range(0, n - 1, 7)]
    assert list(zip(starts.tolist(), sizes.tolist(), strict=True)) == want


def test_processes_tokenize_and_read_only_their_shards(corpus, tok, tmp_path):
    """Two processes: each tokenizes (into its own cache) and reads only every other shard,
    and together an epoch covers every document's pieces."""
    seen, owned = Counter(), []
    for p in range(2):
        cfg = cfg_for(corpus, tmp_path / f"p{p}", eval_fraction=0.0)
        bundle = data.build_data(cfg, tok, global_batch_size=4, task="lm", process_index=p,
                                 process_count=2)
        corpus_p = bundle.streamed
        owned.append(set(corpus_p.mine))
        rows = bundle.train.rows_per_epoch() // 2
        written = finished_shards(corpus_p.directory)
        assert written == {corpus_p.keys[i] for i in corpus_p.mine}
        for batch in batches(bundle, rows // 2):
            seg = batch["segment_ids"]
            for r in range(2):
                for s in range(1, seg[r].max() + 1):
                    seen[tuple(batch["input_ids"][r][seg[r] == s].tolist())] += 1
        bundle.close()
    assert owned[0].isdisjoint(owned[1]) and len(owned[0] | owned[1]) == len(corpus_p.shards)
    both = build(cfg_for(corpus, tmp_path / "one", eval_fraction=0.0), tok)
    one_epoch = Counter()
    for batch in batches(both, both.train.rows_per_epoch() // 4):
        seg = batch["segment_ids"]
        for r in range(4):
            for s in range(1, seg[r].max() + 1):
                one_epoch[tuple(batch["input_ids"][r][seg[r] == s].tolist())] += 1
    assert sum((one_epoch - seen).values()) <= 16 and sum((seen - one_epoch).values()) <= 16


def test_hub_streaming_reads_every_shard(tmp_path, tok):
    """The hub path (`datasets.load_dataset(name, streaming=True)`), given a dataset repo laid
    out on disk: one shard per data file, each document read once."""
    from jaxft.data import shards

    repo = tmp_path / "owner_corpus"
    (repo / "data").mkdir(parents=True)
    texts = []
    for i in range(3):
        rows = [{"text": f"file {i} document {j}"} for j in range(5)]
        texts += [r["text"] for r in rows]
        (repo / "data" / f"train-0000{i}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")
    planned = shards.hub_shards(str(repo))
    assert len(planned) == 3 and {s.kind for s in planned} == {"hub"}
    read = []
    for s in planned:
        read += shards.read_documents(s, text_column="text", skip=False)[0]
    assert sorted(read) == sorted(texts)


RSS_SCRIPT = """
import json, resource, sys
from jaxft import data
from jaxft.data import pipeline  # noqa: F401 - JAX imported before the baseline
from tests.real_weights import smollm2_gguf_path

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

tok = data.load_tokenizer(smollm2_gguf_path())
cfg = data.default_config()
cfg.train_path, cfg.streaming, cfg.cache_dir = sys.argv[1], True, sys.argv[2]
cfg.max_len, cfg.num_workers = 2048, 2
bundle = data.build_data(cfg, tok, global_batch_size=32, task="lm", process_index=0,
                         process_count=1)
next(bundle.train)
base = rss_mb("VmRSS")
rows = bundle.train.rows_per_epoch()
for _ in range(rows // 32):
    next(bundle.train)
print(json.dumps({"base": base, "peak": rss_mb("VmHWM"), "now": rss_mb("VmRSS"),
                  "tokens": bundle.streamed.totals()["tokens"], "rows": rows,
                  "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_corpus(tmp_path):
    """135 MB of articles (~42 M tokens; the in-memory path holds ~50 bytes a token, 2 GB):
    tokenizing all of it and reading a whole epoch grows the training process by < 100 MB
    over its size at the first batch, and no worker peaks above 400 MB."""
    corpus = write_articles(tmp_path / "articles.jsonl", 30_000)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(corpus), str(tmp_path / "c")],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["tokens"] > 40e6 and m["rows"] > 20_000
    assert m["peak"] - m["base"] < 100, m
    assert m["workers_peak"] < 400, m


@pytest.mark.slow
def test_a_streamed_run_trains_and_evaluates_on_its_held_out_documents(corpus, tmp_path):
    """jaxft.train on a streamed corpus, then jaxft.evaluate on its workdir: the same held-out
    documents (the first shard's), the same eval loss to the bit, without tokenizing the rest."""
    from jaxft import evaluate, train
    from tests.tiny_run import tiny_config, tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    cfg = tiny_config(model, tmp_path / "run", **{
        "data.train_path": str(corpus), "data.streaming": True, "data.shard_mb": 0.05,
        "data.cache_dir": str(tmp_path / "cache"), "train.steps": 3, "lora.enabled": False,
        "optim.lr": 1e-3})
    final = train.run(cfg)
    assert final["eval_loss"] < final["base_eval_loss"]
    cache = next((tmp_path / "cache").iterdir())
    for key in finished_shards(cache) - {cfg_keys(cfg)[0]}:  # the held-out shard alone stays
        (cache / f"{key}.json").unlink()
    got = evaluate.run(None, str(tmp_path / "run"))
    assert got["loss"] == final["eval_loss"]
    assert finished_shards(cache) == {cfg_keys(cfg)[0]}  # the rest was not tokenized again
    assert not list(cache.glob("settings.*"))  # every run's workers were closed


def finished_shards(directory: Path) -> set[str]:
    """The keys of the shards a cache directory holds whole (their counts written)."""
    return {f.stem for f in directory.glob("*.json")
            if not f.name.startswith(("settings.", "tokenizer."))}


def cfg_keys(cfg) -> list[str]:
    """The cache keys of the shards of a run config's corpus (with its hold-out)."""
    from jaxft.data import shards

    planned = shards.plan_shards(cfg.data.train_path, shard_bytes=int(cfg.data.shard_mb * 2**20),
                                 document=cfg.data.txt_document)
    return stream.shard_keys(planned, (cfg.data.eval_fraction, cfg.data.seed))


def test_txt_document_file_reads_whole_files_in_memory_too(tmp_path):
    """data.txt_document='file' without streaming: a .txt file is one document, blank lines
    and all (datasets' own `sample_by='document'`); 'paragraph' splits it at blank lines."""
    for i in range(3):
        (tmp_path / f"play{i}.txt").write_text(f"ACT {i}.\n\nSCENE I.\n\nLine {i}.\n")
    whole = sources.load_split(str(tmp_path / "*.txt"), None, eval_fraction=0.0, seed=0,
                               skip_bad_rows=False, text_column="text", txt_document="file")
    assert sorted(whole.train.rows["text"]) == [
        f"ACT {i}.\n\nSCENE I.\n\nLine {i}.\n" for i in range(3)]
    split = sources.load_split(str(tmp_path / "*.txt"), None, eval_fraction=0.0, seed=0,
                               skip_bad_rows=False, text_column="text")
    assert len(split.train.rows) == 9
