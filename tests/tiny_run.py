"""A tiny model directory (with its tokenizer) and a config to train it in seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np
import transformers

from jaxft.config import base_config
from tests import hf_models
from tests.test_data_helpers import tiny_bpe

DATA = Path(__file__).parent / "data"


def tiny_model_dir(path: Path, family: str = "llama", **overrides) -> Path:
    """A random-init HF model whose vocabulary fits a tiny trained BPE tokenizer, saved to path."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_bpe(str(path))
    vocab = len(tokenizer)
    if family == "bert":
        config = hf_models.bert_config(vocab_size=vocab, **overrides)
        model = hf_models.build(config, cls=transformers.BertModel)
    else:
        config = hf_models.CAUSAL_CONFIGS[family]()
        config.vocab_size = vocab
        for key, value in overrides.items():
            setattr(config, key, value)
        model = hf_models.build(config)
    model.save_pretrained(path)
    return path


def tiny_config(model_dir: Path, workdir: Path, **overrides) -> ml_collections.ConfigDict:
    """A fast LoRA run on the sample support chats; dotted overrides like `lora.rank=4`."""
    c = base_config()
    c.workdir = str(workdir)
    c.train.compute_dtype = "float32"
    c.model.path = str(model_dir)
    c.data.train_path = str(DATA / "support_chat.jsonl")
    c.data.max_len = 64
    c.train.steps = 5
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 0
    c.checkpoint.every = 0
    c.lora.rank = 4
    for dotted, value in overrides.items():
        section, _, field = dotted.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


# A GRPO run of the tiny model: text prompts (with a `completion` column beside), rows of 28
# prompt + 12 completion tokens, groups of 4, a reward the tiny model can move
GRPO_TINY = {"task": "grpo", "data.train_path": str(DATA / "faq_prompt_completion.jsonl"),
             "data.max_len": 40, "grpo.max_completion_length": 12, "grpo.num_generations": 4,
             "grpo.reward_funcs": "tests.grpo_rewards:low_id_share"}


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in read_metrics(workdir) if "train_loss" in m}


REPO = Path(__file__).resolve().parent.parent


class NaNAt:
    """A train iterator whose batch for step `step` (1-based) weighs its tokens by NaN, so that
    step's loss and gradient are not finite; everything else is the wrapped iterator's."""

    def __init__(self, inner, step: int):
        self.inner, self.step = inner, step

    def __next__(self):
        local = next(self.inner)
        if self.inner.get_state()["step"] == self.step:
            weight = "loss_mask" if "loss_mask" in local else "valid"
            local = {**local, weight: np.full(local[weight].shape, np.nan, np.float32)}
        return local

    def __getattr__(self, name):  # get_state, set_state, …
        return getattr(self.inner, name)


def with_nan_at(build, step: int):
    """`jaxft.data.build_data` whose train batches turn non-finite at `step`."""

    def build_with_nan(*args, **kwargs):
        bundle = build(*args, **kwargs)
        return dataclasses.replace(bundle, train=NaNAt(bundle.train, step))

    return build_with_nan


def nan_at_step(monkeypatch, step: int) -> None:
    """Make `jaxft.train.run` see a non-finite batch at `step` (a test-only fault)."""
    from jaxft import data

    monkeypatch.setattr(data, "build_data", with_nan_at(data.build_data, step))


def write_config_file(path: Path, model_dir: Path, workdir: Path, nan_at: int = 0,
                      **overrides) -> Path:
    """A configs/*.py-style file returning `tiny_config(...)`, for runs in a subprocess; with
    `nan_at`, loading it also makes that step's batch non-finite (`with_nan_at`)."""
    fault = ("from jaxft import data\n"
             "from tests.tiny_run import with_nan_at\n"
             f"data.build_data = with_nan_at(data.build_data, {nan_at})\n") if nan_at else ""
    path.write_text(
        "from pathlib import Path\n"
        "from tests.tiny_run import tiny_config\n" + fault +
        "def get_config():\n"
        f"    return tiny_config(Path({str(model_dir)!r}), Path({str(workdir)!r}), "
        f"**{overrides!r})\n")
    return path


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a child `python -m jaxft.train` with `devices` CPU devices."""
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    return env
