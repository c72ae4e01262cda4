"""jaxft: fine-tune Hugging Face language models in JAX/Flax and hand them back to PyTorch."""

from jaxft.errors import JaxftError
from jaxft.hf.pretrained import from_pretrained
from jaxft.hf.weights import save_pretrained

__all__ = ["JaxftError", "from_pretrained", "save_pretrained"]
