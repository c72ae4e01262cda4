"""What jaxft trains. The config, the data pipeline and the train step all name tasks from here.

- `lm`: causal language modelling, next-token cross-entropy on the tokens the data marks (all of
  a text, a completion, the assistant's turns);
- `classification`: a sequence classifier (BERT), cross-entropy on one label per row;
- `dpo`: preference tuning of a causal LM on (prompt, chosen, rejected) pairs (`jaxft.dpo`);
- `grpo`: reinforcement learning of a causal LM from rewards on its own completions of prompts
  (`jaxft.grpo`).
"""

LM = "lm"
CLASSIFICATION = "classification"
DPO = "dpo"
GRPO = "grpo"
TASKS = (LM, CLASSIFICATION, DPO, GRPO)
CAUSAL = (LM, DPO, GRPO)  # the tasks that train a causal LM (generation, PEFT CAUSAL_LM export)
