"""Everything Hugging Face, in and out: the hub (`hub`), checkpoint weights read and written
(`weights`), a model built from a `config.json` (`model`), `from_pretrained` (`pretrained`),
PEFT adapters (`adapters`), tokenizers (`tokenizer`) and llama.cpp's GGUF files read (`gguf`)
and written (`gguf_write`).

Nothing here trains: a model comes out of this package, or goes into it, as an `nnx.Module` of
`jaxft.models`.
"""
