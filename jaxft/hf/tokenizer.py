"""Load the tokenizer that belongs to a checkpoint, whatever form the checkpoint arrived in.

`load_tokenizer` accepts an HF model directory, a hub id, or a `.gguf` file (whose embedded
vocabulary and chat template are rebuilt into a transformers tokenizer). Remote code is never
trusted: a tokenizer that needs it is a checkpoint we cannot reproduce, so it fails loudly instead.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import transformers
from transformers import PreTrainedTokenizerBase

from jaxft.errors import JaxftError, first_line
from jaxft.hf import hub

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                    "vocab.json")


def _gguf_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    """A `.gguf` file's tokenizer, rebuilt exactly as `AutoTokenizer(gguf_file=...)` does it
    (transformers' own GGUF-to-tokenizers conversion) but read with the `gguf` package:
    transformers' GGUF reader imports torch, which training never needs otherwise. None where
    this transformers version lays its conversion out differently (then its own path is used).
    """
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf

        renames, special_ids = hf_gguf.GGUF_TOKENIZER_MAPPING, hf_gguf._SPECIAL_TOKENS
    except (ImportError, AttributeError):
        return None
    from jaxft.hf import gguf

    metadata = gguf.read_tokenizer_metadata(path)
    tokenizer, config = (
        {name: metadata[f"tokenizer.{key}"] for key, name in renames[group].items()
         if f"tokenizer.{key}" in metadata}
        for group in ("tokenizer", "tokenizer_config"))
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS unless the file says no
        config.setdefault("add_bos_token", True)
    for name, key in special_ids.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = hf_gguf.convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_path`: an HF directory, a hub id, or a path to a `.gguf` file.

    A directory holding no tokenizer files but exactly one `.gguf` file loads from that file, so
    the same path can be given for weights and tokenizer.
    """
    path = os.fspath(model_path)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise JaxftError(f"GGUF file not found: {path}")
        rebuilt = _gguf_tokenizer(path)
        if rebuilt is not None:
            return rebuilt
        if importlib.util.find_spec("torch") is None:
            # this transformers rebuilds a GGUF file's tokenizer only through its torch loader
            raise JaxftError(f"{path}: reading the tokenizer inside a .gguf file needs torch "
                             "with this transformers version (or use an HF directory)")
        return _from_pretrained(os.path.dirname(os.path.abspath(path)), path,
                                gguf_file=os.path.basename(path))
    if os.path.isdir(path):
        has_files = any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not has_files and len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        if not has_files:
            raise JaxftError(f"{path}: no tokenizer files found (expected one of "
                             f"{', '.join(_TOKENIZER_FILES)}, or a single .gguf file)")
        return _from_pretrained(path, path)
    if hub.looks_local(path):
        raise JaxftError(f"tokenizer path is not a model directory or .gguf file: {path}")
    return _from_pretrained(path, path)  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'


def _from_pretrained(location: str, shown: str, **kwargs) -> PreTrainedTokenizerBase:
    try:
        return transformers.AutoTokenizer.from_pretrained(location, trust_remote_code=False,
                                                          **kwargs)
    except (OSError, ValueError) as e:  # transformers reports missing files/ids as these
        raise JaxftError(f"could not load a tokenizer from {shown}: {first_line(e)}") from e
