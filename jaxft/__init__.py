"""jaxft: fine-tune Hugging Face language models in JAX/Flax and hand them back to PyTorch."""

from jaxft.errors import JaxftError
from jaxft.hf_io import save_pretrained
from jaxft.pretrained import from_pretrained

__all__ = ["JaxftError", "from_pretrained", "save_pretrained"]
