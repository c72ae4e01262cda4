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
`iterator` (resumable, per-process batches), `pipeline` (build_data, build_eval).
"""

from jaxft.data.config import default_config
from jaxft.data.iterator import EvalBatches, TrainIterator, to_global_arrays
from jaxft.data.labels import load_label_map, save_label_map
from jaxft.data.pipeline import DataBundle, EvalData, build_data, build_eval
from jaxft.hf.tokenizer import load_tokenizer

__all__ = [
    "DataBundle",
    "EvalBatches",
    "EvalData",
    "TrainIterator",
    "build_data",
    "build_eval",
    "default_config",
    "load_label_map",
    "load_tokenizer",
    "save_label_map",
    "to_global_arrays",
]
