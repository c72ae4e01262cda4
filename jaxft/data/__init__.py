"""The data pipeline: files or a hub name in, fixed-shape, loss-masked, packed batches out.

    from jaxft import data
    cfg = data.default_config(); cfg.train_path = "tests/data/support_chat.jsonl"
    tok = data.load_tokenizer("path/to/model")          # HF dir, hub id, or .gguf file
    bundle = data.build_data(cfg, tok, global_batch_size=32, task="lm")
    batch = next(bundle.train)                          # this process's [32 / processes, T] rows
    state = bundle.train.get_state()                    # save with the checkpoint
    held_out = data.build_eval(cfg, tok, global_batch_size=32)  # eval rows alone, for a run

Modules, one job each: `config` (fields), `tokenizer` (load_tokenizer), `files` / `sources` /
`chatterbot` (rows), `formats` (which columns mean what), `chat` (chat templates, assistant
spans), `preference` (DPO pairs as TRL tokenizes them), `labels` (label maps), `encode`
(tokens + loss mask), `order` (seeded orderings), `packing` (rows and the batch contract),
`iterator` (resumable, per-process batches), `pipeline` (build_data, build_eval). A raw-text
corpus of any size (data.streaming): `shards` (plan and read shards), `tokenize_worker` (a
tokenizing process), `worker_pool` (feeding them in order), `token_cache` (the on-disk tokens),
`stream` (reading it in a seeded, resumable order while it is still being written).
"""

_LAZY = {"default_config": "jaxft.data.config", "EvalBatches": "jaxft.data.iterator",
         "TrainIterator": "jaxft.data.iterator", "to_global_arrays": "jaxft.data.iterator",
         "load_label_map": "jaxft.data.labels", "save_label_map": "jaxft.data.labels",
         "DataBundle": "jaxft.data.pipeline", "EvalData": "jaxft.data.pipeline",
         "build_data": "jaxft.data.pipeline", "build_eval": "jaxft.data.pipeline",
         "load_tokenizer": "jaxft.hf.tokenizer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Each name loads its module on first use: the tokenizing workers import
    `jaxft.data.shards` and `jaxft.data.token_cache` without JAX or transformers."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxft.data' has no attribute {name!r}")
