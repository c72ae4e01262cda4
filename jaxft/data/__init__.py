"""Data pipeline: sources, formats, tokenization, packing, resumable batches."""
