"""A jaxft model from a Hugging Face `config.json`: the one place a model is constructed.

Loading a checkpoint (`weights.load_hf_model`), the dry run (an abstract model, no weights) and
the benchmark (random weights, initialised on the devices) all start from a `Blueprint`, so the
three build exactly the same module tree: the family `Model`, its run-time options
(`ModelOptions`: dtypes, remat, attention kernel, a classifier head) and, with a quantized base,
its packed kernels. A model trained from scratch (`random_init`) is a blueprint initialised with
no checkpoint read at all. Adapters come later, from `jaxft.lora`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxft import dtypes, models, quant
from jaxft.dtypes import DTypeLike
from jaxft.errors import JaxftError, first_line
from jaxft.models import config_checks, layers


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model is built around its config: the parameter dtype (`jnp.bfloat16`,
    "bfloat16", …), the compute dtype (None: the parameters'), a sequence classifier's classes
    (`num_labels`: a fresh head where the checkpoint has none), the remat policy, the attention
    kernel, a quantized frozen base, the seed of freshly initialised parameters, and
    `random_init`: every weight freshly initialised from the config alone (transformers'
    `from_config`: training from scratch), no checkpoint read."""

    param_dtype: DTypeLike = "float32"
    compute_dtype: DTypeLike | None = None
    num_labels: int | None = None
    remat: str = "none"
    attention: str = "auto"
    quantize: quant.QuantConfig | None = None
    seed: int = 0
    random_init: bool = False

    @property
    def quantized(self) -> bool:
        return self.quantize is not None and self.quantize.enabled


def model_config(hf_config: dict, source: str, options: ModelOptions | None = None
                 ) -> tuple[models.Family, models.ModelConfig]:
    """(family module, its Config) for a Hugging Face config, with the run-time options set.
    `source` names the config in errors."""
    options = options or ModelOptions()
    family = models.family_for(hf_config, source=source)
    missing = config_checks.unstated(hf_config)
    if missing:
        raise JaxftError(f"{source}: missing field {missing[0]!r}")
    wrong = config_checks.problems(hf_config)
    if wrong:
        raise JaxftError(f"{source}: {wrong[0]}")
    resolved = with_defaults(hf_config, source)
    wrong = config_checks.problems(resolved)
    if wrong:  # the file's fields fit together, but not with a default of what it leaves out
        raise JaxftError(f"{source}: with transformers' defaults for the fields it leaves out, "
                         f"{wrong[0]}")
    try:
        cfg = family.Config.from_hf(resolved, num_labels=options.num_labels)
    except KeyError as e:
        raise JaxftError(f"{source}: missing field {e.args[0]!r}") from e
    except JaxftError as e:
        raise JaxftError(f"{source}: {e}") from e
    compute = (None if options.compute_dtype is None
               else dtypes.canonical(options.compute_dtype, "compute_dtype"))
    return family, dataclasses.replace(cfg, dtype=compute, remat=options.remat,
                                       attention=options.attention,
                                       hf_config_json=json.dumps(hf_config, sort_keys=True))


def with_defaults(hf_config: dict, source: str) -> dict:
    """The config as transformers reads it: every field the file leaves out takes the default
    of its transformers config class (Gemma 2's `query_pre_attn_scalar` 256, Mistral's 4096-token
    window, Phi-3's `rms_norm_eps` 1e-5 …), and what the class derives (Gemma's and Qwen's
    `layer_types`) is derived as it derives it, so a field missing from config.json never builds
    a model other than the one transformers builds. Only the config class is used: no model, no
    torch, no remote code."""
    from transformers import AutoConfig

    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
        resolved = AutoConfig.for_model(hf_config["model_type"], **fields).to_dict()
    except Exception as e:  # noqa: BLE001  (its classes raise ValueError, TypeError, their own)
        cause = e.__cause__ or e
        raise JaxftError(f"{source}: transformers' {hf_config['model_type']} config refuses it "
                         f"({first_line(cause)})") from None
    return {**resolved, "model_type": hf_config["model_type"]}


@dataclasses.dataclass
class Blueprint:
    """What `build` constructs: the family, its config and the options. A quantized base's
    `encoders` (kernel path -> how a checkpoint tensor becomes packed arrays) are filled in by
    `build`, so the loader that traced it knows how to fill the packed kernels."""

    family: models.Family
    config: models.ModelConfig
    options: ModelOptions
    encoders: dict[str, quant.Encoder] = dataclasses.field(default_factory=dict)

    def build(self) -> nnx.Module:
        """The model with freshly initialised (random) weights; a quantized base's projections
        packed and zero-filled. Meant for `nnx.eval_shape` or a `jax.jit`."""
        std = json.loads(self.config.hf_config_json or "{}").get("initializer_range", 0.02)
        with layers.initializer_range(std):
            model = self.family.Model(self.config, rngs=nnx.Rngs(self.options.seed),
                                      param_dtype=dtypes.jax_dtype(self.options.param_dtype))
        if self.options.quantized:
            self.encoders.update(quant.quantize_kernels(model, self.options.quantize))
        return model

    def abstract(self) -> nnx.Module:
        """The model as shapes only: what the dry run compiles and the loader fills."""
        return nnx.eval_shape(self.build)

    def initialised(self, mesh: Mesh | None = None) -> nnx.Module:
        """The model with random weights, initialised inside one jit, so only the weights
        themselves are ever allocated (the benchmark's model, a model trained from scratch);
        with a `mesh`, each weight created straight on its sharding over it, so no device ever
        holds the whole model."""
        from jaxft import sharding

        graphdef, abstract = nnx.split(self.abstract())
        shardings = None if mesh is None else sharding.state_shardings(abstract, mesh)
        return nnx.merge(graphdef, jax.jit(lambda: nnx.split(self.build())[1],
                                           out_shardings=shardings)())

    def initialiser(self, paths: list[str]) -> Callable[[], dict[str, jax.Array]]:
        """A function returning the freshly initialised values of some parameters, for
        `jax.jit`: with only these as outputs XLA drops every other initialiser, so a
        classifier head on an 8B encoder costs the head, not a second copy of the model."""
        from jaxft.models import params

        wanted = set(paths)

        def init() -> dict[str, jax.Array]:
            flat = params.flat_variables(nnx.state(self.build(), nnx.Param))
            return {path: var.get_value() for path, var in flat.items() if path in wanted}

        return init


def blueprint(hf_config: dict, source: str, options: ModelOptions | None = None) -> Blueprint:
    """The `Blueprint` of the model a Hugging Face config describes, built with `options`."""
    options = options or ModelOptions()
    if options.quantize is not None:
        options.quantize.check()
    family, cfg = model_config(hf_config, source, options)
    return Blueprint(family, cfg, options)
