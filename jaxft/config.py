"""Every field of a training run, with its default, and the checks that run before any compile.

`configs/*.py` start from `base_config()` and change what their recipe needs; users override
any field on the command line (`--config.lora.rank=16`). Configs are locked, so a misspelt field
is refused instead of silently ignored.
"""

from __future__ import annotations

import ml_collections

from jaxft import data, lora
from jaxft.errors import JaxftError
from jaxft.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

TASKS = ("lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # metrics.jsonl, TensorBoard events, config.json, checkpoints/
    c.task = "lm"  # 'lm' (causal LM) or 'classification' (BERT sequence classifier)

    c.model = ml_collections.ConfigDict()
    # HF directory, hub id, .gguf file, or 'package:<python package>/<file>' for weights shipped
    # inside an installed package (the offline defaults).
    c.model.path = ""
    c.model.num_labels = 0  # classification: classes (0 = from the data's label map)
    # Attention kernel: auto = cuDNN flash attention on a GPU in 16-bit, XLA elsewhere.
    c.model.attention = "auto"

    c.data = data.default_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 8  # global batch, in rows of data.max_len tokens
    c.train.accum_steps = 1  # micro-batches per step (gradient accumulation)
    c.train.seed = 0
    c.train.remat = "none"  # rematerialisation of each layer: none | full | dots_saveable
    # Precision. The loss, softmax and normalisation statistics are float32 whatever these say,
    # and LoRA factors are always float32 (as PEFT keeps them).
    c.train.param_dtype = "float32"  # the weights: full FT's master copy, or LoRA's frozen base
    # Matmul inputs and activations: auto = bfloat16 on TPU/GPU, float32 on CPU.
    c.train.compute_dtype = "auto"
    c.train.optimizer_state_dtype = "float32"  # AdamW's two moments (bfloat16 halves them)
    c.train.log_every = 10
    c.train.eval_every = 50  # 0 = only at the end
    c.train.eval_batches = 0  # cap on eval batches (0 = the whole eval split)
    c.train.on_nonfinite = "skip"  # a NaN/inf loss or gradient: 'skip' the update, or 'stop'
    c.train.sample_prompts = ()  # greedy completions logged at each eval (metrics, TensorBoard)
    c.train.sample_tokens = 32
    c.train.corrupt_batch_at = 0  # fault drill: feed NaN into this step's loss (0 = never)

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
    # HF module names (PEFT's target_modules), 'all-linear', or one regex over full HF paths.
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.lora.use_rslora = False
    c.lora.rank_pattern = ""  # per-target ranks, e.g. "q_proj:16,v_proj:4"
    c.lora.modules_to_save = ()  # modules trained in full beside the adapters (e.g. classifier)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps between checkpoints (0 = only at the end)
    c.checkpoint.keep = 2  # newest checkpoints kept
    c.checkpoint.resume = "auto"  # auto: resume if workdir has one | never: refuse | fresh: wipe
    return c


def validate(c: ml_collections.ConfigDict, device_count: int) -> None:
    """Refuse a bad config with one line, before any weights load or anything compiles."""
    from jaxft.sharding import data_parallel_size_of, mesh_shape

    _one_of("task", c.task, TASKS)
    _one_of("train.param_dtype", c.train.param_dtype, DTYPES)
    _one_of("train.compute_dtype", c.train.compute_dtype, ("auto", *DTYPES))
    _one_of("train.optimizer_state_dtype", c.train.optimizer_state_dtype, DTYPES)
    _one_of("model.attention", c.model.attention, ATTENTION_IMPLEMENTATIONS)
    if c.model.attention == "cudnn":
        import jax

        if jax.default_backend() != "gpu" or compute_dtype(c) == "float32":
            raise JaxftError(f"config: model.attention 'cudnn' needs a GPU and a 16-bit "
                             f"train.compute_dtype; this is {jax.default_backend()} with "
                             f"{compute_dtype(c)} (use 'auto')")
    _one_of("train.remat", c.train.remat, tuple(REMAT_POLICIES))
    _one_of("train.on_nonfinite", c.train.on_nonfinite, ("skip", "stop"))
    _one_of("checkpoint.resume", c.checkpoint.resume, ("auto", "never", "fresh"))
    if not c.model.path:
        raise JaxftError("config: model.path is empty (an HF directory, hub id or .gguf file)")
    if not c.data.train_path:
        raise JaxftError("config: data.train_path is empty")
    for name in ("train.steps", "train.batch_size", "train.accum_steps", "data.max_len"):
        section, field = name.split(".")
        if c[section][field] <= 0:
            raise JaxftError(f"config: {name} must be positive, got {c[section][field]}")
    if c.lora.enabled and c.lora.rank <= 0:
        raise JaxftError(f"config: lora.rank must be positive, got {c.lora.rank}")
    if c.lora.enabled and not 0 <= c.lora.dropout < 1:
        raise JaxftError(f"config: lora.dropout must be in [0, 1), got {c.lora.dropout}")
    if c.optim.lr <= 0:
        raise JaxftError(f"config: optim.lr must be positive, got {c.optim.lr}")
    shape = mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, device_count)
    dp = data_parallel_size_of(shape)
    if c.train.batch_size % (dp * c.train.accum_steps):
        raise JaxftError(f"config: train.batch_size {c.train.batch_size} is not divisible by the "
                         f"data-parallel size {dp} (mesh.data×mesh.fsdp) × train.accum_steps "
                         f"{c.train.accum_steps}")
    parse_rank_pattern(c.lora.rank_pattern)


def compute_dtype(c: ml_collections.ConfigDict) -> str:
    """`train.compute_dtype` with 'auto' resolved for this backend: bfloat16 where the matrix
    units want it (TPU, GPU), float32 on CPU, where bfloat16 matmuls are emulated and slower."""
    import jax

    if c.train.compute_dtype != "auto":
        return c.train.compute_dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def lora_config(c: ml_collections.ConfigDict) -> lora.LoraConfig | None:
    """The `LoraConfig` a run's config describes, or None for full fine-tuning.

    The one place a LoraConfig is built from a config: train, evaluate, generate and export all
    rebuild the same adapters from it.
    """
    if not c.lora.enabled:
        return None
    targets = c.lora.targets
    return lora.LoraConfig(
        rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
        targets=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=c.lora.use_rslora, rank_pattern=parse_rank_pattern(c.lora.rank_pattern),
        modules_to_save=tuple(c.lora.modules_to_save))


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise JaxftError(f"config: {name} is {value!r}, expected one of {', '.join(allowed)}")


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
