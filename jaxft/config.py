"""Every field of a training run, with its default, and the canonical form of the fields that
take several spellings.

`configs/*.py` start from `base_config()` and change what their recipe needs; users override
any field on the command line (`--config.lora.rank=16`). Configs are locked, so a misspelt field
is refused instead of silently ignored. `jaxft.spec` checks a config and resolves it, once,
into the typed `RunSpec` every module reads.

Fields that take a string or a list (`lora.targets`, `lora.modules_to_save`,
`lora.target_parameters`, `train.sample_prompts`) and the dtype fields are typed `object`: a
config file may assign `("q_proj", "v_proj")` or `jnp.bfloat16`, and on the command line a
value is read as a Python literal when it is one
(`--config.lora.targets='("q_proj","v_proj")'`) and as a plain string otherwise
(`--config.lora.targets=all-linear`, `--config.train.param_dtype=bfloat16`); `spec.validate`
then reduces each to its canonical form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxft import data, lora, tasks
from jaxft.errors import JaxftError


def _any(default: Any) -> ml_collections.FieldReference:
    """A field that takes a string, a list or a dtype (see the module docstring)."""
    return ml_collections.FieldReference(default, field_type=object)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # metrics.jsonl, TensorBoard events, config.json, checkpoints/
    # 'lm' (causal LM), 'classification' (BERT sequence classifier), 'dpo' (preference
    # tuning of a causal LM on prompt/chosen/rejected pairs: the `dpo` section) or 'grpo'
    # (reinforcement learning from reward functions on sampled completions: `grpo`)
    c.task = tasks.LM

    c.model = ml_collections.ConfigDict()
    # HF directory, hub id, .gguf file, or 'package:<python package>/<file>' for weights shipped
    # inside an installed package (the offline defaults).
    c.model.path = ""
    # pretrained: model.path's weights | random: model.path's config.json only, every weight
    # freshly initialised (training from scratch, as transformers' from_config)
    c.model.init = "pretrained"
    c.model.tokenizer = ""  # where the tokenizer loads from ("" = model.path), same forms
    c.model.num_labels = 0  # classification: classes (0 = from the data's label map)
    # Attention kernel: auto = cuDNN flash attention on a GPU in 16-bit, splash on a TPU, XLA
    # elsewhere.
    c.model.attention = "auto"

    c.data = data.default_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    # Passes over the train rows instead of train.steps (0: use train.steps): the steps are
    # then epochs × rows per epoch / batch_size, rounded up, once the data is read.
    c.train.epochs = 0.0
    c.train.batch_size = 8  # global batch, in rows of data.max_len tokens
    c.train.accum_steps = 1  # micro-batches per step (gradient accumulation)
    c.train.seed = 0
    c.train.remat = "none"  # rematerialisation of each layer: none | full | dots_saveable
    # Precision. The loss, softmax and normalisation statistics are float32 whatever these say,
    # and LoRA factors are always float32 (as PEFT keeps them).
    # The weights: full FT's master copy, or LoRA's frozen base.
    c.train.param_dtype = _any("float32")
    # Matmul inputs and activations: auto = bfloat16 on TPU/GPU, float32 on CPU.
    c.train.compute_dtype = _any("auto")
    c.train.optimizer_state_dtype = _any("float32")  # AdamW's two moments (bfloat16 halves them)
    c.train.log_every = 10
    c.train.eval_every = 50  # 0 = only at the end
    c.train.eval_batches = 0  # cap on eval batches (0 = the whole eval split)
    # Stop when the eval metric (eval_loss; eval_accuracy for classification) has not improved by
    # more than min_delta in `patience` evals in a row; the best eval's weights are kept in
    # W/best_checkpoint (export/evaluate/generate --step=best). Needs train.eval_every > 0.
    c.train.early_stopping = ml_collections.ConfigDict()
    c.train.early_stopping.enabled = False
    c.train.early_stopping.patience = 3
    c.train.early_stopping.min_delta = 0.0
    c.train.on_nonfinite = "skip"  # a NaN/inf loss or gradient: 'skip' the update, or 'stop'
    # Greedy completions logged at each eval (metrics, TensorBoard): a prompt or a list of them.
    c.train.sample_prompts = _any(())
    c.train.sample_tokens = 32

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "cosine"  # cosine | linear | constant, after the warm-up
    c.optim.warmup_steps = 10
    c.optim.final_lr_ratio = 0.1  # the schedule ends at lr * final_lr_ratio
    c.optim.weight_decay = 0.0  # AdamW decay on matrices only (never norms or biases)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    c.optim.loraplus_lr_ratio = 1.0  # LoRA+: learning rate of B relative to A (e.g. 16)

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    # HF module names (PEFT's target_modules): a list, or 'q_proj,v_proj' on the command line;
    # 'all-linear'; or one regex over full HF paths ('.*layers\.[0-9]+\.self_attn\.q_proj').
    c.lora.targets = _any(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"))
    c.lora.use_rslora = False
    c.lora.use_dora = False  # DoRA (PEFT's use_dora): a trained magnitude per output feature
    c.lora.rank_pattern = ""  # per-target ranks, e.g. "q_proj:16,v_proj:4"
    # Modules trained in full beside the adapters (e.g. classifier): a name or a list of them.
    c.lora.modules_to_save = _any(())
    # A mixture of experts' expert weights (PEFT's target_parameters), which are parameters,
    # not projections: e.g. 'mlp.experts.gate_up_proj,mlp.experts.down_proj'.
    c.lora.target_parameters = _any(())
    # The frozen base under the adapters (jaxft.quant): 'none' keeps train.param_dtype; 'nf4'
    # is QLoRA's 4-bit NormalFloat exactly as bitsandbytes stores it; 'int8' per-channel absmax;
    # 'mxfp4' packs only a mixture of experts' experts (gpt-oss's released format).
    c.lora.base_quant = "none"
    c.lora.quant_block_size = 64  # nf4: weights per absmax (bitsandbytes' blocksize)
    c.lora.double_quant = False  # nf4: quantize the absmaxes too (bnb_4bit_use_double_quant)

    c.dpo = ml_collections.ConfigDict()  # task='dpo' (jaxft.dpo; TRL's definitions and names)
    c.dpo.beta = 0.1  # strength of the pull towards the reference model
    c.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | hinge | ipo | robust
    c.dpo.label_smoothing = 0.0  # robust: the assumed share of flipped labels, in [0, 0.5)
    # Score every pair with the reference model in one pass before training, from the weights
    # as loaded. False: LoRA runs the base with the adapters off in each step; full fine-tuning
    # keeps a frozen copy of the initial weights (sharded like the trained ones) and scores
    # each batch with it (one more copy of the weights in memory, none of the up-front pass).
    c.dpo.precompute_ref = False

    # task='grpo' (jaxft.grpo; TRL's GRPOConfig names and defaults). A step's train.batch_size
    # rows are completions: batch_size / num_generations prompts, each answered num_generations
    # times by the policy as it is, scored by the reward functions. A row is data.max_len
    # tokens: the prompt (its last max_len - max_completion_length tokens) and the completion.
    c.grpo = ml_collections.ConfigDict()
    # 'module:function' (a file's module on sys.path, or the working directory), or a built-in
    # of jaxft.rewards by name; called as TRL calls them: f(prompts, completions,
    # completion_ids, **columns) -> one float (or None) per completion.
    c.grpo.reward_funcs = _any(())
    c.grpo.reward_weights = _any(())  # one per function (default: all 1)
    c.grpo.num_generations = 8
    c.grpo.loss_type = "dapo"  # dapo | grpo | dr_grpo | bnpo
    c.grpo.beta = 0.0  # KL towards the reference (LoRA: the base with the adapters off)
    c.grpo.epsilon = 0.2  # the ratio's lower clip (ε_low)
    c.grpo.epsilon_high = 0.0  # the upper clip (0: = epsilon; DAPO's clip-higher: 0.28)
    c.grpo.delta = 0.0  # a bound on the unclipped ratio (0: none; two-sided clipping)
    c.grpo.scale_rewards = "group"  # group | batch | none: what the advantages divide by
    # Steps each batch of completions serves (TRL's num_iterations): after the first, the ratio
    # to the policy that sampled them (scored once, as they are drawn) is clipped.
    c.grpo.num_iterations = 1
    c.grpo.max_completion_length = 64
    c.grpo.mask_truncated_completions = False  # completions without EOS train nothing
    c.grpo.temperature = 1.0
    c.grpo.top_p = 1.0
    c.grpo.top_k = 0
    c.grpo.rollout_batch_size = 0  # completions sampled at once (0: the step's batch_size)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.expert = 1  # a mixture of experts' experts split over this many devices

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps between checkpoints (0 = only at the end)
    c.checkpoint.keep = 2  # newest checkpoints kept
    c.checkpoint.resume = "auto"  # auto: resume if workdir has one | never: refuse | fresh: wipe

    # Weights & Biases (optional extra `jaxft[wandb]`): set a project to log there too.
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb = ml_collections.ConfigDict()
    c.logging.wandb.project = ""
    c.logging.wandb.entity = ""
    c.logging.wandb.name = ""  # default: the workdir's name
    c.logging.wandb.tags = _any(())
    c.logging.wandb.mode = ""  # online | offline | disabled ("" = W&B's default / WANDB_MODE)
    return c


# LoRA fields added after runs were first saved: a workdir's config.json may lack them.
LATER_LORA_FIELDS = ("use_dora", "base_quant", "quant_block_size", "double_quant")


# A string of these is a module name (or a comma-separated list of names), never a regex: a
# name can only fullmatch itself, which is what the list form matches too.
_NAME_LIST = re.compile(r"[\w.-]+(,[\w.-]+)*")


def lora_targets(value: str | Sequence[str]) -> str | tuple[str, ...]:
    """`lora.targets` in canonical form: 'all-linear', a regex string, or a tuple of names.

    PEFT's `target_modules` is a list of names or one regex; on a command line a list is most
    easily typed `q_proj,v_proj`, so a string made only of names and commas is that list.
    """
    if isinstance(value, str):
        value = value.strip()
        if lora.is_all_linear(value):
            return lora.ALL_LINEAR
        if _NAME_LIST.fullmatch(value):
            return tuple(value.split(","))
        return value
    return names(value, "lora.targets")


def names(value: str | Sequence[str], field: str) -> tuple[str, ...]:
    """A tuple of module names from a name, 'a,b' or a list of names."""
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return _strings(value, field)


def texts(value: str | Sequence[str], field: str) -> tuple[str, ...]:
    """A tuple of texts from one text (kept whole, commas and all) or a list of them; an empty
    text is none (`--config.train.sample_prompts=` turns them off)."""
    if isinstance(value, str):
        return (value,) if value else ()
    return _strings(value, field)


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise JaxftError(f"config: {field} must be a string or a list of strings, got "
                         f"{value!r}")
    return tuple(value)


def parse_rank_pattern(text: str) -> tuple[tuple[str, int], ...]:
    """'q_proj:16,v_proj:4' -> (('q_proj', 16), ('v_proj', 4))."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, rank = item.partition(":")
        if not rank.strip().isdigit() or int(rank) <= 0:
            raise JaxftError(f"config: lora.rank_pattern entry {item!r} is not 'module:rank' "
                             "with a positive rank")
        pairs.append((name.strip(), int(rank)))
    return tuple(pairs)
