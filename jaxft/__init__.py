"""jaxft: fine-tune Hugging Face language models in JAX/Flax and hand them back to PyTorch."""

import logging as _logging
import os as _os

# Before transformers and datasets are first imported: their import-time notes are not for
# jaxft's users. transformers advises that "PyTorch was not found", which jaxft never needs to
# train; datasets logs the JAX version it found. (setdefault: a user's own choice stands.)
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_logging.getLogger("datasets.config").setLevel(_logging.WARNING)

from jaxft.errors import JaxftError  # noqa: E402

__all__ = ["JaxftError", "from_pretrained", "save_pretrained"]
_LAZY = {"from_pretrained": "jaxft.hf.pretrained", "save_pretrained": "jaxft.hf.weights"}


def __getattr__(name: str):
    """JAX, Flax and transformers load on first use, not with the package: a tokenizing worker
    (`jaxft.data.tokenize_worker`) imports jaxft and needs none of them."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxft' has no attribute {name!r}")
