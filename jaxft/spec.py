"""A run's config, checked and resolved once into the typed `RunSpec` every module reads.

`validate` refuses a bad config in one line before anything loads or compiles; `resolve` then
turns it into a `RunSpec`: the LoRA, quantization and DPO settings as their own dataclasses, the
DPO reference mode, the compute dtype resolved for the platform that will train (the dry run's
target, when it plans for a TPU slice or a GPU), and the validated config for the plain fields.
Training, the dry run, `--suggest`, evaluation, export and the benchmark all take a `RunSpec`,
so none of them can read the config differently from another. A finished run's `config.json`
becomes one with `of_saved_run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from jaxft import config, dtypes, lora, quant, tasks, wandb_log
from jaxft.dpo import DpoConfig
from jaxft.errors import JaxftError
from jaxft.grpo import GrpoConfig
from jaxft.hf.model import ModelOptions
from jaxft.models.attention import ATTENTION_IMPLEMENTATIONS
from jaxft.models.stack import REMAT_POLICIES
from jaxft.sharding import data_parallel_size_of, mesh_shape
from jaxft.tasks import DPO, GRPO, TASKS

# model.init: a checkpoint's weights, or only its config (training from scratch).
RANDOM_INIT = "random"
MODEL_INITS = ("pretrained", RANDOM_INIT)

# Where a DPO run's reference log-probabilities come from (see `dpo.precompute_ref`).
PRECOMPUTED = "precomputed"  # scored in one pass before training
ADAPTERS_OFF = "adapters_off"  # LoRA: the base with the adapters off, in the step
FROZEN_COPY = "frozen_copy"  # full fine-tuning: a frozen copy of the initial weights, per batch


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run trains and how, resolved once from its config (see the module docstring).

    `config` is the validated config, in canonical form; modules read its plain fields (data,
    optim, mesh, checkpoint, logging, train.steps …) from it and never change it.
    """

    config: ml_collections.ConfigDict
    task: str
    platform: str  # 'cpu', 'gpu' or 'tpu': what the run trains on (or the dry run targets)
    compute_dtype: str  # train.compute_dtype with 'auto' resolved for `platform`
    lora: lora.LoraConfig | None  # None: full fine-tuning
    quant: quant.QuantConfig
    dpo: DpoConfig | None  # task 'dpo' only
    # tasks 'dpo' and 'grpo' (with beta > 0): PRECOMPUTED (DPO), ADAPTERS_OFF or FROZEN_COPY
    reference: str | None
    grpo: GrpoConfig | None = None  # task 'grpo' only

    @property
    def train(self) -> ml_collections.ConfigDict:
        return self.config.train

    @property
    def full(self) -> bool:
        """Full fine-tuning: every weight trains."""
        return self.lora is None

    @property
    def causal(self) -> bool:
        """A causal LM (generation, PEFT's CAUSAL_LM): language modelling or preference."""
        return self.task in tasks.CAUSAL

    @property
    def batch_ref_logps(self) -> bool:
        """DPO or GRPO batches carry the reference's log-probabilities (scored outside the
        step)."""
        return self.reference in (PRECOMPUTED, FROZEN_COPY)

    @property
    def step_reference(self) -> bool:
        """DPO's reference runs its own forward for each training batch (LoRA's base inside
        the step, or the frozen copy before it)."""
        return self.reference in (ADAPTERS_OFF, FROZEN_COPY)

    @property
    def sequences_per_row(self) -> int:
        """Token sequences in a row of the batch: a DPO pair is two."""
        return 2 if self.task == DPO else 1

    def model_options(self, num_labels: int | None = None, *,
                      param_dtype: str | None = None) -> ModelOptions:
        """How to build the run's model: `num_labels` for a classifier's head, `param_dtype`
        to override the run's (export in float32, say)."""
        return ModelOptions(param_dtype=param_dtype or self.train.param_dtype,
                            compute_dtype=self.compute_dtype, num_labels=num_labels,
                            remat=self.train.remat, attention=self.config.model.attention,
                            quantize=self.quant, seed=self.train.seed,
                            random_init=self.config.model.get("init") == RANDOM_INIT)


def resolve(c: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> RunSpec:
    """Validate a run's config (in place: canonical spellings) for the devices it will train
    on (default: this machine's; the dry run passes its target's compile-only devices) and
    resolve it into its `RunSpec`."""
    devices = list(devices) if devices is not None else jax.devices()
    platform = platform_of(devices[0])
    validate(c, len(devices), platform)
    return _spec(c, platform)


def of_saved_run(c: ml_collections.ConfigDict, platform: str | None = None) -> RunSpec:
    """The `RunSpec` of a finished run's saved `config.json` (already validated when it
    trained; fields added since then take their defaults), for this machine's platform."""
    return _spec(c, platform or jax.default_backend())


def model_paths(c: ml_collections.ConfigDict) -> tuple[str, str]:
    """(model, tokenizer): the local paths of `model.path` and `model.tokenizer` (model.path's
    tokenizer when empty), fetched from the hub where they are hub ids; a model trained from
    scratch fetches no weights."""
    from jaxft.hf import hub

    model = str(hub.resolve(c.model.path, weights=c.model.get("init") != RANDOM_INIT))
    tokenizer = c.model.get("tokenizer") or ""
    return model, (str(hub.resolve(tokenizer, weights=False)) if tokenizer else model)


def platform_of(device: Any) -> str:
    """'tpu', 'gpu' or 'cpu' for a device, real or compile-only."""
    return "gpu" if device.platform in ("cuda", "rocm", "gpu") else device.platform


def _spec(c: ml_collections.ConfigDict, platform: str) -> RunSpec:
    preference = c.task == DPO
    return RunSpec(config=c, task=c.task, platform=platform,
                   compute_dtype=_compute_dtype(c, platform), lora=_lora_config(c),
                   quant=_quant_config(c), dpo=_dpo_config(c) if preference else None,
                   reference=(_dpo_reference(c) if preference else
                              _grpo_reference(c) if c.task == GRPO else None),
                   grpo=grpo_config(c) if c.task == GRPO else None)


def _check_early_stopping(c: ml_collections.ConfigDict) -> None:
    settings = c.train.early_stopping
    if not settings.enabled:
        return
    if not isinstance(settings.patience, int) or settings.patience <= 0:
        raise JaxftError(f"config: train.early_stopping.patience must be a positive number of "
                         f"evals, got {settings.patience!r}")
    if settings.min_delta < 0:
        raise JaxftError(f"config: train.early_stopping.min_delta must be >= 0, got "
                         f"{settings.min_delta}")
    if c.train.eval_every <= 0:
        raise JaxftError("config: train.early_stopping needs evals during the run: set "
                         "train.eval_every to a positive number of steps")


def validate(c: ml_collections.ConfigDict, device_count: int,
             platform: str | None = None) -> None:
    """Refuse a bad config with one line, before any weights load or anything compiles.

    `device_count` and `platform` are those of the machine the run will train on (the dry run
    for a TPU slice passes the slice's; by default, this machine's).

    The string-or-list and dtype fields are first reduced to their canonical form, in place, so
    everything downstream (and `config.json`) sees one spelling.
    """
    _one_of("task", c.task, TASKS)
    for name in ("param_dtype", "optimizer_state_dtype"):
        c.train[name] = dtypes.canonical(c.train[name], f"config: train.{name}")
    if c.train.compute_dtype != "auto":
        c.train.compute_dtype = dtypes.canonical(c.train.compute_dtype,
                                                 "config: train.compute_dtype", also=("auto",))
    c.lora.targets = config.lora_targets(c.lora.targets)
    c.lora.modules_to_save = config.names(c.lora.modules_to_save, "lora.modules_to_save")
    c.lora.target_parameters = config.names(c.lora.target_parameters,
                                            "lora.target_parameters")
    c.train.sample_prompts = config.texts(c.train.sample_prompts, "train.sample_prompts")
    _one_of("model.attention", c.model.attention, ATTENTION_IMPLEMENTATIONS)
    platform = platform or jax.default_backend()
    if c.model.attention == "cudnn" and (platform != "gpu"
                                         or _compute_dtype(c, platform) == "float32"):
        raise JaxftError(f"config: model.attention 'cudnn' needs a GPU and a 16-bit "
                         f"train.compute_dtype; this is {platform} with "
                         f"{_compute_dtype(c, platform)} (use 'auto')")
    if c.model.attention == "splash" and platform != "tpu":
        raise JaxftError(f"config: model.attention 'splash' is a TPU kernel; this is {platform} "
                         "(use 'auto')")
    _one_of("train.remat", c.train.remat, tuple(REMAT_POLICIES))
    _one_of("train.on_nonfinite", c.train.on_nonfinite, ("skip", "stop"))
    _one_of("checkpoint.resume", c.checkpoint.resume, ("auto", "never", "fresh"))
    if not c.model.path:
        raise JaxftError("config: model.path is empty (an HF directory, hub id or .gguf file)")
    _one_of("model.init", c.model.init, MODEL_INITS)
    if c.model.init == RANDOM_INIT and c.lora.enabled:
        raise JaxftError("config: model.init='random' trains from scratch, which LoRA cannot "
                         "(its base would stay random): set lora.enabled=False")
    if not c.data.train_path:
        raise JaxftError("config: data.train_path is empty")
    for name in ("train.steps", "train.batch_size", "train.accum_steps", "data.max_len"):
        section, field = name.split(".")
        if c[section][field] <= 0:
            raise JaxftError(f"config: {name} must be positive, got {c[section][field]}")
    if not isinstance(c.train.epochs, (int, float)) or c.train.epochs < 0:
        raise JaxftError(f"config: train.epochs must be 0 (use train.steps) or a positive "
                         f"number of passes over the data, got {c.train.epochs!r}")
    _check_early_stopping(c)
    c.logging.wandb.tags = config.names(c.logging.wandb.tags, "logging.wandb.tags")
    wandb_log.check(c)
    if c.lora.enabled and c.lora.rank <= 0:
        raise JaxftError(f"config: lora.rank must be positive, got {c.lora.rank}")
    if c.lora.enabled and not 0 <= c.lora.dropout < 1:
        raise JaxftError(f"config: lora.dropout must be in [0, 1), got {c.lora.dropout}")
    if c.lora.use_dora and not c.lora.enabled:
        raise JaxftError("config: lora.use_dora needs lora.enabled (DoRA is a LoRA variant)")
    if c.lora.base_quant != quant.NONE and not c.lora.enabled:
        raise JaxftError(f"config: lora.base_quant={c.lora.base_quant!r} needs lora.enabled: a "
                         "full fine-tune trains the weights it would freeze in low precision")
    try:
        _quant_config(c).check()
    except JaxftError as e:
        raise JaxftError(f"config: {e}") from None
    if c.optim.lr <= 0:
        raise JaxftError(f"config: optim.lr must be positive, got {c.optim.lr}")
    shape = mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, device_count, c.mesh.expert)
    dp = data_parallel_size_of(shape)
    if c.train.batch_size % (dp * c.train.accum_steps):
        raise JaxftError(f"config: train.batch_size {c.train.batch_size} is not divisible by the "
                         f"data-parallel size {dp} (mesh.data×mesh.fsdp×mesh.expert) × "
                         "train.accum_steps "
                         f"{c.train.accum_steps}")
    config.parse_rank_pattern(c.lora.rank_pattern)
    if c.task == DPO:
        try:
            _dpo_config(c).check()
        except JaxftError as e:
            raise JaxftError(f"config: {e}") from None
        if c.data.max_prompt_len < 0:
            raise JaxftError(f"config: data.max_prompt_len must be >= 0, got "
                             f"{c.data.max_prompt_len}")
    if c.task == GRPO:
        _check_grpo(c)




def _check_grpo(c: ml_collections.ConfigDict) -> None:
    """GRPO's settings, its reward functions (imported here, before anything loads) and how
    its rows fit the batch and the row width."""
    from jaxft import rewards

    try:
        grpo_config(c).check()
    except JaxftError as e:
        raise JaxftError(f"config: {e}") from None
    g = c.grpo
    g.reward_funcs = config.names(g.reward_funcs, "grpo.reward_funcs")
    if isinstance(g.reward_weights, str):
        g.reward_weights = config.names(g.reward_weights, "grpo.reward_weights")
    try:
        g.reward_weights = tuple(float(w) for w in g.reward_weights)
    except (TypeError, ValueError):
        raise JaxftError(f"config: grpo.reward_weights must be numbers, got "
                         f"{g.reward_weights!r}") from None
    rewards.resolve(g.reward_funcs, g.reward_weights)
    if c.train.batch_size % g.num_generations:
        raise JaxftError(f"config: train.batch_size {c.train.batch_size} (completions per "
                         f"step) is not a multiple of grpo.num_generations {g.num_generations}")
    if g.max_completion_length >= c.data.max_len:
        raise JaxftError(f"config: grpo.max_completion_length {g.max_completion_length} leaves "
                         f"no room for the prompt in data.max_len {c.data.max_len}")
    if g.rollout_batch_size < 0:
        raise JaxftError(f"config: grpo.rollout_batch_size must be >= 0 (0: train.batch_size), "
                         f"got {g.rollout_batch_size}")


def grpo_config(c: ml_collections.ConfigDict) -> GrpoConfig:
    """`GrpoConfig` from the config's `grpo` section (0 meaning TRL's None where it has one)."""
    g = c.grpo
    return GrpoConfig(num_generations=g.num_generations, loss_type=g.loss_type, beta=g.beta,
                      epsilon=g.epsilon, epsilon_high=g.epsilon_high or None,
                      delta=g.delta or None, scale_rewards=g.scale_rewards,
                      num_iterations=g.get("num_iterations", 1),
                      max_completion_length=g.max_completion_length,
                      mask_truncated_completions=g.mask_truncated_completions,
                      temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise JaxftError(f"config: {name} is {value!r}, expected one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# The typed views: built here only
# ---------------------------------------------------------------------------------------------


def _grpo_reference(c: ml_collections.ConfigDict) -> str | None:
    """GRPO's reference, when `beta` asks for one: LoRA's base with the adapters off in the
    step, or, for full fine-tuning, a frozen copy of the initial weights scoring each batch."""
    if not c.grpo.beta:
        return None
    return ADAPTERS_OFF if c.lora.enabled else FROZEN_COPY


def _dpo_reference(c: ml_collections.ConfigDict) -> str:
    if c.dpo.precompute_ref:
        return PRECOMPUTED
    return ADAPTERS_OFF if c.lora.enabled else FROZEN_COPY


def _dpo_config(c: ml_collections.ConfigDict) -> DpoConfig:
    return DpoConfig(beta=c.dpo.beta, loss_type=c.dpo.loss_type,
                     label_smoothing=c.dpo.label_smoothing)


def _compute_dtype(c: ml_collections.ConfigDict, platform: str) -> str:
    """'auto' is bfloat16 where the matrix units want it (TPU, GPU), float32 on CPU, where
    bfloat16 matmuls are emulated and slower."""
    if c.train.compute_dtype != "auto":
        return dtypes.canonical(c.train.compute_dtype, "config: train.compute_dtype")
    return "float32" if platform == "cpu" else "bfloat16"


def _lora_config(c: ml_collections.ConfigDict) -> lora.LoraConfig | None:
    if not c.lora.enabled:
        return None
    return lora.LoraConfig(
        rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
        targets=config.lora_targets(c.lora.targets), use_rslora=c.lora.use_rslora,
        use_dora=_lora_field(c, "use_dora"),
        rank_pattern=config.parse_rank_pattern(c.lora.rank_pattern),
        modules_to_save=config.names(c.lora.modules_to_save, "lora.modules_to_save"),
        target_parameters=config.names(_lora_field(c, "target_parameters"),
                                       "lora.target_parameters"))


def _quant_config(c: ml_collections.ConfigDict) -> quant.QuantConfig:
    """'none' for runs saved before quantization existed."""
    return quant.QuantConfig(kind=_lora_field(c, "base_quant"),
                             block_size=_lora_field(c, "quant_block_size"),
                             double_quant=_lora_field(c, "double_quant"))


def _lora_field(c: ml_collections.ConfigDict, name: str) -> Any:
    """A LoRA field of a run's config, or its default where the run predates the field."""
    return c.lora.get(name, config.base_config().lora[name])
