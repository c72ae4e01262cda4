"""The `data` section of a training config: where the examples come from and how they become rows.

A training config embeds this as `config.data = data.default_config()` and overrides fields, e.g.
`--config.data.train_path=tests/data/support_chat.jsonl --config.data.max_len=1024`. Every field is
read by `jaxft.data.build_data`; nothing here is interpreted anywhere else.
"""

from __future__ import annotations

import ml_collections

FORMATS = ("auto", "text", "prompt_completion", "messages", "classification", "preference")
OVERLONG = ("truncate", "drop")


def default_config() -> ml_collections.ConfigDict:
    """Defaults that suit a small instruction-tuning run; every field can be overridden."""
    c = ml_collections.ConfigDict()
    # A local .jsonl/.json/.csv/.parquet/.txt file, a directory or glob of them, a hub dataset
    # name, or a built-in source ('chatterbot:chat', 'chatterbot:topics').
    c.train_path = ml_collections.FieldReference(None, field_type=str)
    # A separate eval file. When None, `eval_fraction` of the train rows is held out instead.
    c.eval_path = ml_collections.FieldReference(None, field_type=str)
    # Fraction of train rows held out (by a seeded hash of the row index, so the split never
    # moves) when there is no eval_path and the source has no eval split of its own (built-ins
    # and hub datasets do). 0 = no eval set at all.
    c.eval_fraction = 0.1
    # 'auto' picks from the columns: messages > prompt/completion > instruction/output > text
    # (for task='lm'), or classification (for task='classification').
    c.format = "auto"
    # Tokens per row: the fixed sequence length of every batch, so the train step compiles once.
    c.max_len = 512
    # Pack several examples into each row (segment_ids keep them apart) instead of padding each
    # example to max_len; packing wastes far less compute on short examples.
    c.packing = True
    # Preference pairs (task='dpo'): a prompt longer than this keeps its last max_prompt_len
    # tokens (the end, next to the answer) before prompt + response is cut to max_len; 0 = no
    # separate prompt limit.
    c.max_prompt_len = 0
    # Examples longer than max_len: 'truncate' keeps the first max_len tokens, 'drop' removes them.
    # Both are counted in DataBundle.stats. Plain text is chunked instead and never truncated.
    c.overlong = "truncate"
    # Skip (and count) malformed rows instead of stopping at the first one.
    c.skip_bad_rows = False
    # For 'messages' with a tokenizer that has no chat template: 'chatml', or a Jinja template
    # string. When set it also overrides the tokenizer's own template.
    c.chat_template = ml_collections.FieldReference(None, field_type=str)
    # Stream a raw-text corpus of any size (format 'text'; .jsonl, .jsonl.gz, .parquet, .txt or
    # a tree of text/code files): worker processes tokenize it shard by shard into an on-disk
    # cache (reused by later runs) while training reads finished shards, memory-mapped, in a
    # seeded order. Host memory then holds one shard, not the corpus (see jaxft.data.stream).
    c.streaming = False
    # Tokenizing processes for data.streaming; 0 = every core this process may use.
    c.num_workers = 0
    # Where data.streaming keeps tokenized shards; None = $JAXFT_CACHE, else
    # ~/.cache/jaxft/tokenized. Keyed by tokenizer and settings: a change is never read stale.
    c.cache_dir = ml_collections.FieldReference(None, field_type=str)
    # Text per shard (MiB) for data.streaming: the unit of tokenizing, reading and shuffling.
    c.shard_mb = 8.0
    # What one document of a .txt file is: 'paragraph' (blank-line separated) or 'file' (the
    # whole file, as for a code base). Files of other extensions are always one document each.
    c.txt_document = "paragraph"
    # Seeds the eval split and each epoch's shuffle.
    c.seed = 0
    # Column names, for files whose columns are named differently.
    c.text_column = "text"
    c.prompt_column = "prompt"
    c.completion_column = "completion"
    c.messages_column = "messages"
    c.chosen_column = "chosen"  # preference pairs: the preferred response (text or messages)
    c.rejected_column = "rejected"  # and the other one
    c.label_column = "label"
    # Optional second text for sentence-pair classification (token_type_ids become 1 on it).
    c.text_pair_column = ml_collections.FieldReference(None, field_type=str)
    # Classification labels: a JSON file or dict {name: id}. None builds one from the train labels
    # (sorted names; integer labels are used as ids as they are). Labels outside it are an error.
    c.label_map = ml_collections.FieldReference(None, field_type=object)
    return c
