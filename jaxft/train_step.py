"""The train and eval steps, and `build`: the one place they are assembled for a mesh.

The model arrives split: `trainable` (everything in full fine-tuning, the adapters in LoRA),
`frozen` (the rest) and `dropout` (dropout keys, rewritten each step). Gradients are taken with
respect to `trainable` only. A batch of `accum_steps` micro-batches is scanned, summing token
losses and gradients, then normalised once by the token count, so accumulation computes exactly
what one big batch would.

The step never hands a value to the host. It carries a `window` of running sums on the device
(loss and tokens for the logged mean, non-finite steps and the first of them, the last gradient
norm), which the training loop reads only when it logs, evaluates or checkpoints; the dropout
keys derive from the step number inside the step. `build` splits the model, derives every
sharding from the parameters' logical axes, makes the optimizer, and jits both steps with
explicit in/out shardings and donation: `jaxft.train`, the dry-run planner and the benchmark
all run exactly what it returns. `build_evaluation` is its eval step alone, for `jaxft.evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxft import dpo, grpo, lora, optim, sharding, tasks
from jaxft.kernels.cross_entropy import head_cross_entropy
from jaxft.models import experts, layers
from jaxft.spec import RunSpec

Batch = dict[str, jax.Array]


def lm_losses(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy over `loss_mask`, and the token count.

    When the model's output head is one plain matrix (`output_head()`), the head and the loss
    run fused, a chunk of positions at a time (`head_cross_entropy`): the [B, T, V] float32
    logits are never held at once. Otherwise the full logits are computed and reduced.

    A mixture of experts adds its load-balancing loss times `aux_loss_coef` (transformers'
    `router_aux_loss_coef` when `output_router_logits` is on) to each token's loss, so the
    mean is transformers' `loss + coef · aux_loss`.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    routed = model.config.routes_tokens
    inputs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"],
                  **({"return_router": True} if routed else {}))
    head = model.output_head()
    out = model(batch["input_ids"], return_hidden=head is not None, **inputs)
    out, aux = out if routed else (out, None)
    if head is not None:  # out: the hidden states, B T D
        loss_sum = head_cross_entropy(out, head, batch["targets"], mask)
    else:  # out: the logits, B T V
        logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # B T
        loss_sum = jnp.sum(nll * mask)
    if not routed:
        return {"loss_sum": loss_sum, "count": count}
    balance = experts.load_balancing_loss(aux)
    if model.config.aux_loss_coef:
        loss_sum = loss_sum + model.config.aux_loss_coef * balance * count
    # token-weighted, as the loss is, so the logged mean over a window is the aux loss
    return {"loss_sum": loss_sum, "count": count, "aux_loss_sum": balance * count,
            "expert_load": aux.load}


def classifier_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    """A classifier's float32 logits [B, C] for a classification batch: what its loss, its
    metrics and its predictions are all computed from."""
    return model(batch["input_ids"], batch["attention_mask"],
                 batch.get("token_type_ids")).astype(jnp.float32)


def classification_losses(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """Summed cross-entropy and correct predictions over valid rows, and their confusion
    matrix [predicted, label] (what macro-F1 is computed from; training drops it)."""
    logits = classifier_logits(model, batch)  # B C
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)[:, 0]
    valid = batch.get("valid", jnp.ones_like(nll)).astype(jnp.float32)
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == batch["labels"]).astype(jnp.float32)
    classes = logits.shape[-1]
    confusion = jnp.einsum("bp,bl->pl", jax.nn.one_hot(predicted, classes) * valid[:, None],
                           jax.nn.one_hot(batch["labels"], classes))  # C C
    return {"loss_sum": jnp.sum(nll * valid), "count": jnp.sum(valid),
            "correct": jnp.sum(correct * valid), "confusion": confusion}


LossFn = Callable[[nnx.Module, Batch], dict[str, jax.Array]]
LOSSES: dict[str, LossFn] = {tasks.LM: lm_losses, tasks.CLASSIFICATION: classification_losses}


def task_losses(task: str, preference: dpo.DpoConfig | None = None,
                policy: grpo.GrpoConfig | None = None) -> LossFn:
    """The loss function of `task`: summed losses and counts (see `sum_names`). Preference
    tuning needs its `DpoConfig` (β, the loss type) and GRPO its `GrpoConfig`, which the others
    take none of."""
    if task == tasks.DPO:
        if preference is None:
            raise ValueError("task 'dpo' needs its DpoConfig")
        return dpo.preference_losses(preference)
    if task == tasks.GRPO:
        if policy is None:
            raise ValueError("task 'grpo' needs its GrpoConfig")
        return grpo.policy_losses(policy)
    return LOSSES[task]


def sum_names(task: str) -> tuple[str, ...]:
    """The (scalar) sums a task's loss function returns: for DPO `count` is pairs and the
    rest are TRL's metrics, summed over them."""
    if task == tasks.CLASSIFICATION:
        return ("loss_sum", "count", "correct")
    if task == tasks.DPO:
        return ("loss_sum", "count", *dpo.METRICS)
    if task == tasks.GRPO:
        return ("loss_sum", "count", *grpo.TOKEN_METRICS, "tokens")
    return ("loss_sum", "count")


def zero_sums(task: str, num_labels: int | None = None) -> dict[str, np.ndarray]:
    """Those sums as zeros, on the host (`Step` places them; under jit they are constants).
    An evaluation of a classifier (`num_labels`) also sums its confusion matrix."""
    sums = {n: np.zeros((), np.float32) for n in sum_names(task)}
    if task == tasks.CLASSIFICATION and num_labels:
        sums["confusion"] = np.zeros((num_labels, num_labels), np.float32)
    return sums


# What a mixture of experts adds to the training window: its load-balancing loss (summed as
# the loss is, over tokens) and how many of the tokens' expert choices went to each expert.
ROUTER_SUMS = ("aux_loss_sum", "expert_load")


def routed_experts(model: nnx.Module) -> int:
    """The experts a model routes tokens to (0: a dense model)."""
    return model.config.num_experts if model.config.routes_tokens else 0


def router_sums(num_experts: int) -> dict[str, np.ndarray]:
    """`ROUTER_SUMS` as zeros for a model with `num_experts` experts (none for a dense one)."""
    if not num_experts:
        return {}
    return {"aux_loss_sum": np.zeros((), np.float32),
            "expert_load": np.zeros((num_experts,), np.float32)}


def zero_window(task: str, num_experts: int = 0) -> dict[str, np.ndarray]:
    """An empty logging window: what the train step accumulates between two host reads.

    `loss_sum`/`count` (and `correct`) sum over the window's finite steps, so the logged loss is
    their token-weighted mean (a skipped step trained nothing); `nonfinite` counts the skipped
    steps and `first_nonfinite` is the first one's number (0: none); `grad_norm` is the last
    step's. A mixture of experts' window also sums `ROUTER_SUMS`.
    """
    return {**zero_sums(task), **router_sums(num_experts), "nonfinite": np.zeros((), np.int32),
            "first_nonfinite": np.zeros((), np.int32), "grad_norm": np.zeros((), np.float32)}


def fresh_dropout_keys(dropout: nnx.State, rng: jax.Array) -> nnx.State:
    """New dropout keys (one per dropout site, and per layer when stacked: the model's own and
    LoRA's) derived from the step's rng."""
    leaves, treedef = jax.tree.flatten(dropout)
    new = []
    for i, leaf in enumerate(leaves):
        key = jax.random.fold_in(rng, i)
        new.append(jax.random.split(key, leaf.shape[0]) if leaf.ndim == 2 else key)
    return jax.tree.unflatten(treedef, new)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, task: str,
                    accum_steps: int = 1, seed: int = 0,
                    preference: dpo.DpoConfig | None = None, num_experts: int = 0,
                    policy: grpo.GrpoConfig | None = None) -> Callable:
    """`step(trainable, frozen, dropout, opt_state, window, batch, number) -> (trainable,
    opt_state, window)`, where `number` is the 0-based step being taken; batch arrays have the
    global batch as their leading dimension.

    A step whose loss or gradient is not finite leaves parameters and optimizer state untouched
    and is counted in the window, so no saved state ever follows a NaN. Dropout keys are
    `fold_in(PRNGKey(seed), number)`: a pure function of the step, so a resumed run draws
    exactly the keys an uninterrupted one would, with no RNG state to checkpoint. A mixture of
    experts (`num_experts`) also sums its routing into the window (`ROUTER_SUMS`).
    """
    losses_fn = task_losses(task, preference, policy)
    zeros_sums = {**zero_sums(task), **router_sums(num_experts)}
    names = tuple(zeros_sums)

    def loss(trainable, frozen, dropout, micro):
        model = nnx.merge(graphdef, trainable, frozen, dropout)
        out = losses_fn(model, micro)
        return out["loss_sum"], {k: out[k] for k in names}  # the window's scalars

    grad_fn = jax.grad(loss, has_aux=True)

    def step(trainable, frozen, dropout, opt_state, window, batch, number):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), number)
        micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

        def body(carry, xs):
            grads_sum, sums = carry
            index, mb = xs
            keys = fresh_dropout_keys(dropout, jax.random.fold_in(rng, index))
            grads, out = grad_fn(trainable, frozen, keys, mb)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, jax.tree.map(jnp.add, sums, out)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        (grads, sums), _ = jax.lax.scan(body, (zeros, zeros_sums),
                                        (jnp.arange(accum_steps), micro))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, trainable)
        with jax.named_scope("optimizer"):
            updates, new_opt_state = tx.update(grads, opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
            new_trainable = _select(finite, new_trainable, trainable)
            new_opt_state = _select(finite, new_opt_state, opt_state)
        new_window = {k: window[k] + jnp.where(finite, v, 0.0) for k, v in sums.items()}
        new_window["nonfinite"] = window["nonfinite"] + (~finite).astype(jnp.int32)
        first_bad = (~finite) & (window["first_nonfinite"] == 0)
        new_window["first_nonfinite"] = jnp.where(first_bad, number + 1,
                                                  window["first_nonfinite"]).astype(jnp.int32)
        new_window["grad_norm"] = grad_norm.astype(jnp.float32)
        return new_trainable, new_opt_state, new_window

    return step


def _select(condition: jax.Array, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def make_eval_step(graphdef: nnx.GraphDef, *, task: str,
                   preference: dpo.DpoConfig | None = None) -> Callable:
    """`eval_step(trainable, frozen, dropout, sums, batch) -> sums` plus this batch's
    `sum_names(task)`: an evaluation accumulates on the device and is read once."""
    losses_fn = task_losses(task, preference)

    def eval_step(trainable, frozen, dropout, sums, batch):
        out = losses_fn(nnx.merge(graphdef, trainable, frozen, dropout), batch)
        return {k: sums[k] + out[k] for k in sums}  # (a router's statistics are training's)

    return eval_step


def make_reference_step(graphdef: nnx.GraphDef, policy: grpo.GrpoConfig | None = None
                        ) -> Callable:
    """`reference(trainable, frozen, dropout, batch)`: the reference model's log-probabilities
    of a batch of preference pairs [B, 2] (`dpo.base_logps`), or with a `policy` (GRPO) of each
    completion token [B, C]: for the pass that scores pairs before training, or, given the
    frozen copy of the initial weights as `trainable`, for each batch of a full fine-tune."""

    def reference(trainable, frozen, dropout, batch):
        model = nnx.merge(graphdef, trainable, frozen, dropout)
        if policy is not None:
            return grpo.reference_completion_logps(model, batch, policy.temperature)
        return dpo.base_logps(model, batch)

    return reference


def make_policy_logps_step(graphdef: nnx.GraphDef, policy: grpo.GrpoConfig) -> Callable:
    """`old_logps(trainable, frozen, dropout, batch) -> [B, C]`: GRPO's completions scored by
    the policy as it is (adapters on), once as they are drawn, for the later iterations over
    them (`num_iterations` > 1)."""

    def old_logps(trainable, frozen, dropout, batch):
        model = nnx.merge(graphdef, trainable, frozen, dropout)
        return grpo.completion_logps(model, batch, policy.temperature)[0]

    return old_logps


# ---------------------------------------------------------------------------------------------
# The assembly: split → shardings → optimizer → jit, for jaxft.train, the planner, the benchmark
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A model's eval step (and DPO's reference pass), jitted for a mesh: what the training
    loop's evals and `jaxft.evaluate` both run.

    `evaluate(trainable, frozen, dropout, sums, batch)` adds a batch's sums to `sums` (donated;
    None for GRPO, whose evaluation samples);
    `reference(trainable, frozen, dropout, batch) -> [B, 2]` scores preference pairs with the
    weights it is given, adapters off. Batches arrive as global arrays (rows over data × fsdp ×
    expert).
    """

    eval_graphdef: nnx.GraphDef  # the model in eval mode
    task: str
    mesh: Mesh
    shardings: dict[str, Any]  # trainable, frozen, dropout (and opt_state): NamedSharding trees
    evaluate: Callable | None
    # task 'dpo', unless LoRA's base is the reference in the step (`spec.ADAPTERS_OFF`)
    reference: Callable | None
    num_labels: int | None  # a classifier's classes: its evaluation sums a confusion matrix

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return sharding.replicated(self.mesh)

    def place(self, states: dict[str, nnx.State]) -> dict[str, Any]:
        """The split states on their shardings: real arrays from real ones,
        `ShapeDtypeStruct`s carrying shardings from abstract ones (the dry run)."""
        return {name: _place(state, self.shardings[name]) for name, state in states.items()}

    def zero_sums(self) -> dict[str, jax.Array]:
        """Empty evaluation sums, on the devices."""
        return jax.device_put(zero_sums(self.task, self.num_labels), self.replicated)


@dataclasses.dataclass(frozen=True)
class Step(Evaluation):
    """A model's train step beside its `Evaluation`, jitted for a mesh, with everything they
    were built from. `train(trainable, frozen, dropout, opt_state, window, batch, number)`
    donates the trainable parameters, the optimizer state and the window.
    """

    graphdef: nnx.GraphDef  # training mode: dropout on
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train: Callable
    num_experts: int = 0  # a mixture of experts: its window also sums `ROUTER_SUMS`
    # GRPO with num_iterations > 1: scores a batch of completions with the sampling policy
    old_logps: Callable | None = None

    def place(self, states: dict[str, nnx.State]) -> dict[str, Any]:
        """`Evaluation.place`, plus the optimizer state."""
        placed = super().place(states)
        if _is_abstract(placed["trainable"]):
            init = jax.eval_shape(self.tx.init, placed["trainable"])
            placed["opt_state"] = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), init,
                self.shardings["opt_state"])
        else:
            placed["opt_state"] = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"]
                                          )(placed["trainable"])
        return placed

    def zero_window(self) -> dict[str, jax.Array]:
        """An empty logging window, on the devices."""
        return jax.device_put(zero_window(self.task, self.num_experts), self.replicated)

    @property
    def window_sums(self) -> tuple[str, ...]:
        """The sums of the window the host folds into its log lines."""
        return sum_names(self.task) + (ROUTER_SUMS if self.num_experts else ())


def split(model: nnx.Module, lora_cfg: lora.LoraConfig | None
          ) -> tuple[nnx.GraphDef, nnx.GraphDef, dict[str, nnx.State]]:
    """(training graphdef, eval graphdef, states): the model split into what trains
    (everything in full fine-tuning, else the adapters and `modules_to_save`), its dropout
    keys and the frozen rest."""
    model.train()  # dropout on, at the checkpoint's rates (and LoRA's)
    graphdef, trainable, dropout, frozen = nnx.split(
        model, lora.trainable_filter(lora_cfg), layers.DropoutKey, ...)
    model.eval()
    eval_graphdef = nnx.split(model, lora.trainable_filter(lora_cfg), layers.DropoutKey, ...)[0]
    return graphdef, eval_graphdef, {"trainable": trainable, "dropout": dropout,
                                     "frozen": frozen}


def build_evaluation(model: nnx.Module, mesh: Mesh, task: str, *,
                     lora_cfg: lora.LoraConfig | None = None,
                     preference: dpo.DpoConfig | None = None,
                     reference: bool = False) -> tuple[Evaluation, dict[str, nnx.State]]:
    """The eval step for `model` on `mesh`, and the model split as `split` does (not yet
    placed). `preference` is task 'dpo''s loss; `reference` adds the pass that scores pairs
    with other weights (a full fine-tune's initial ones)."""
    _, eval_graphdef, states = split(model, lora_cfg)
    shardings = {name: sharding.state_shardings(s, mesh) for name, s in states.items()}
    return _evaluation(eval_graphdef, shardings, mesh, task, preference, reference,
                       model.config.num_labels), states


def _evaluation(eval_graphdef: nnx.GraphDef, shardings: dict[str, Any], mesh: Mesh, task: str,
                preference: dpo.DpoConfig | None, reference: bool,
                num_labels: int | None, policy: grpo.GrpoConfig | None = None) -> Evaluation:
    replicated = sharding.replicated(mesh)
    params = (shardings["trainable"], shardings["frozen"], shardings["dropout"])
    evaluate = None  # GRPO evaluates by sampling and scoring (`jaxft.rollout`), not by a loss
    if task != tasks.GRPO:
        evaluate = jax.jit(sharding.traced_under(mesh, make_eval_step(
            eval_graphdef, task=task, preference=preference)),
            in_shardings=(*params, replicated, None), out_shardings=replicated,
            donate_argnums=(3,))
    score = None
    if reference:
        score = jax.jit(sharding.traced_under(mesh, make_reference_step(eval_graphdef, policy)),
                        in_shardings=(*params, None), out_shardings=replicated)
    return Evaluation(eval_graphdef, task, mesh, shardings, evaluate, score, num_labels)


def build(model: nnx.Module, run: RunSpec, mesh: Mesh) -> tuple[Step, dict[str, nnx.State]]:
    """The steps `run` describes for `model` (real or from `nnx.eval_shape`, adapters already
    attached) on `mesh`, and the model split into its `trainable`, `dropout` and `frozen`
    states (not yet placed: see `Step.place`). Reads the run's task, LoRA and DPO settings,
    `optim` and `train.{steps, accum_steps, seed, optimizer_state_dtype}`.
    """
    graphdef, eval_graphdef, states = split(model, run.lora)
    shardings = {name: sharding.state_shardings(s, mesh) for name, s in states.items()}
    # The optimizer is built for the trees the step will see: arrays, as `place` leaves them.
    params = _abstract(states["trainable"], shardings["trainable"])
    tx, schedule = optim.make_optimizer(run.config.optim, params, run.train.steps,
                                        state_dtype=run.train.optimizer_state_dtype)
    shardings["opt_state"] = sharding.optimizer_shardings(tx, params, shardings["trainable"],
                                                          mesh)
    evaluation = _evaluation(eval_graphdef, shardings, mesh, run.task, run.dpo,
                             run.batch_ref_logps, model.config.num_labels, run.grpo)
    replicated = sharding.replicated(mesh)
    train = jax.jit(
        sharding.traced_under(mesh, make_train_step(
            graphdef, tx, task=run.task, accum_steps=run.train.accum_steps, seed=run.train.seed,
            preference=run.dpo, num_experts=routed_experts(model), policy=run.grpo)),
        in_shardings=(shardings["trainable"], shardings["frozen"], shardings["dropout"],
                      shardings["opt_state"], replicated, None, replicated),
        out_shardings=(shardings["trainable"], shardings["opt_state"], replicated),
        donate_argnums=(0, 3, 4))
    old_logps = None
    if run.grpo is not None and run.grpo.num_iterations > 1:
        old_logps = jax.jit(sharding.traced_under(mesh, make_policy_logps_step(
            eval_graphdef, run.grpo)), in_shardings=(shardings["trainable"], shardings["frozen"],
                                                     shardings["dropout"], None),
            out_shardings=sharding.batch_sharding(mesh))  # rows as the batch's, kept with it
    fields = {f.name: getattr(evaluation, f.name) for f in dataclasses.fields(Evaluation)}
    return Step(**fields, graphdef=graphdef, tx=tx, schedule=schedule, train=train,
                num_experts=routed_experts(model), old_logps=old_logps), states


def _is_abstract(state: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


def _abstract(state: nnx.State, shardings: nnx.State) -> Any:
    return jax.tree.map(lambda s, v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        shardings, state)


def _place(state: nnx.State, shardings: nnx.State) -> Any:
    if _is_abstract(state):
        return _abstract(state, shardings)
    return sharding.put_state(state, shardings)


def step_number(step: int) -> np.ndarray:
    """The step number as the train step takes it: a host scalar, so passing it never waits."""
    return np.asarray(step, np.int32)
