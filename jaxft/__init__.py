"""jaxft: fine-tune Hugging Face language models in JAX/Flax and hand them back to PyTorch."""

import logging as _logging
import os as _os

# Before transformers and datasets are first imported: their import-time notes are not for
# jaxft's users. transformers advises that "PyTorch was not found", which jaxft never needs to
# train; datasets logs the JAX version it found. (setdefault: a user's own choice stands.)
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_logging.getLogger("datasets.config").setLevel(_logging.WARNING)

from jaxft.errors import JaxftError  # noqa: E402
from jaxft.hf.pretrained import from_pretrained  # noqa: E402
from jaxft.hf.weights import save_pretrained  # noqa: E402

__all__ = ["JaxftError", "from_pretrained", "save_pretrained"]
