r"""`--dry_run --suggest`: which remat policy, micro-batch count and mesh layout to run.

  python -m jaxft.train --config=configs/lora.py --config.model.path=<8B dir> \
      --config.train.batch_size=8 --config.data.max_len=2048 --dry_run --topology=v5e-8 --suggest
  python -m jaxft.train --config=configs/lora.py ... --dry_run --topology=h100x8 --suggest

A user otherwise finds these by trial and out-of-memory error, one paid-for slice or GPU start
at a time. Here each candidate is the real step compiled by `jaxft.plan` (for a TPU slice by
XLA:TPU itself, for GPUs by XLA:GPU), so "fits" is the compiler's figure, not a formula's.

The candidates, at the configured global batch: remat `none` / `dots_saveable` / `full`;
micro-batches (`train.accum_steps`) 1, 2, 4, … while each still has a row per data-parallel
device; and the layouts `fsdp` over every device, `data` over every device, and fsdp with
`tensor` 2 or 4. They are ranked by the time bound (`Plan.step_seconds`: the step's FLOPs,
remat's recomputation included, at the devices' peak rate), then by fewer micro-batches (each
one re-gathers fsdp's weights and runs smaller matmuls), then by the layout order above, then
by less memory. The ranking is a compute-bound estimate: it knows nothing of communication.

The search is bounded (`MAX_COMPILES`). Memory only falls with more remat and more micro-batches,
so a candidate is not compiled when one that saves at least as much in the same layout did not
fit. Each layout is tried with its best-ranked candidate first, then its most frugal one: a
layout that fits at once costs one compile, one that cannot fit at all two.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
from collections.abc import Sequence

import ml_collections

from jaxft import spec
from jaxft.errors import JaxftError
from jaxft.plan import dry_run as plan_lib
from jaxft.plan import flops
from jaxft.plan.targets import Target, target

MAX_COMPILES = 12
REMATS = ("none", "dots_saveable", "full")  # least to most memory saved
TENSOR_SIZES = (2, 4)
# The layouts tried split devices between data, fsdp and tensor; a user's expert axis is set
# back to its default, in the compiles and in the command.
NO_EXPERT_AXIS = {"mesh.expert": 1}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting to try: a mesh layout, a remat policy, a micro-batch count."""

    layout: str  # "fsdp", "data", "fsdp+tensor2", …
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    remat: str
    accum_steps: int

    def overrides(self) -> dict[str, object]:
        data, fsdp, tensor = self.mesh
        return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                "train.remat": self.remat, "train.accum_steps": self.accum_steps}

    def saves_at_least_as_much_as(self, other: Candidate) -> bool:
        return (self.layout == other.layout and self.accum_steps >= other.accum_steps
                and REMATS.index(self.remat) >= REMATS.index(other.remat))


@dataclasses.dataclass
class Trial:
    candidate: Candidate
    plan: plan_lib.Plan | None = None  # None: not compiled (skipped, or over the budget)
    skipped: str = ""  # why it was not compiled

    @property
    def fits(self) -> bool:
        return self.plan is not None and bool(self.plan.fits)


def layouts(devices: int, batch_size: int | None = None
            ) -> list[tuple[str, tuple[int, int, int]]]:
    """The mesh layouts worth comparing, in preference order (those the batch can use); one
    device has one layout."""
    if devices == 1:
        return [("one device", (1, 1, 1))]
    found = [("fsdp", (1, devices, 1)), ("data", (devices, 1, 1))]
    found += [(f"fsdp+tensor{t}", (1, devices // t, t)) for t in TENSOR_SIZES
              if devices % t == 0 and devices // t > 1]
    return [(name, shape) for name, shape in found
            if batch_size is None or batch_size % (shape[0] * shape[1]) == 0]


def candidates(devices: int, batch_size: int) -> list[Candidate]:
    found = []
    for name, shape in layouts(devices, batch_size):
        rows = batch_size // (shape[0] * shape[1])  # rows per data-parallel device
        accums = [2**i for i in range(int(math.log2(rows)) + 1) if rows % 2**i == 0]
        found += [Candidate(name, shape, remat, a) for remat in REMATS for a in accums]
    return found


def search(cfg: ml_collections.ConfigDict, topology: Target,
           max_compiles: int = MAX_COMPILES, progress=print) -> list[Trial]:
    """Compile candidates in the order above until each layout has its best fit or the budget
    is spent; every candidate comes back, compiled or with the reason it was not."""
    trials = [Trial(c) for c in candidates(topology.num_devices, cfg.train.batch_size)]
    if not trials:
        smallest = min(d * f for _, (d, f, _) in layouts(topology.num_devices))
        raise JaxftError(f"--suggest: train.batch_size {cfg.train.batch_size} cannot be split "
                         f"over {topology.num_devices} {topology.device_word}s in any layout; use "
                         f"a multiple of {smallest}")
    rate = topology.peak_flops or 1.0  # a card of unknown peak: rank by FLOPs alone
    seconds = {remat: sum(step) / rate
               for remat, step in flops_by_remat(cfg, topology).items()}
    order = [name for name, _ in layouts(topology.num_devices, cfg.train.batch_size)]

    def rank(trial: Trial) -> tuple:
        """Time bound, micro-batches, layout order, memory (when known)."""
        c = trial.candidate
        memory = trial.plan.peak_bytes if trial.plan is not None else 0
        return (seconds[c.remat], c.accum_steps, order.index(c.layout), memory)

    compiles = 0

    def compile_one(trial: Trial) -> None:
        nonlocal compiles
        compiles += 1
        c = trial.candidate
        started = time.perf_counter()
        progress(f"  [{compiles}/{max_compiles}] compiling {c.layout}, remat {c.remat}, "
                 f"{c.accum_steps} micro-batch(es) …")
        trial.plan = plan_lib.make_plan(with_overrides(cfg, {**c.overrides(), **NO_EXPERT_AXIS}),
                                        topology)
        verdict = "fits" if trial.fits else "does not fit"
        progress(f"      {verdict}: {plan_lib.human_bytes(trial.plan.peak_bytes)} per "
                 f"{topology.device_word} "
                 f"({time.perf_counter() - started:.0f} s)")

    def pruned(trial: Trial) -> bool:
        return any(t.plan is not None and not t.fits
                   and t.candidate.saves_at_least_as_much_as(trial.candidate) for t in trials)

    by_layout: dict[str, list[Trial]] = {}
    for t in trials:
        by_layout.setdefault(t.candidate.layout, []).append(t)
    for group in by_layout.values():
        ranked = sorted(group, key=rank)
        frugal = max(group, key=lambda t: (REMATS.index(t.candidate.remat),
                                           t.candidate.accum_steps))
        # The layout's best first: often it fits, and one compile settles the layout.
        if compiles >= max_compiles:
            break
        compile_one(ranked[0])
        if ranked[0].fits:
            continue
        # Then its most frugal: if that does not fit, nothing in the layout can.
        if frugal.plan is None:
            if compiles >= max_compiles:
                break
            compile_one(frugal)
            if not frugal.fits:
                continue
        # Then the rest in rank order, down to the first that fits (frugal at the latest).
        for trial in ranked[1:]:
            if trial.plan is not None:
                if trial.fits:
                    break
                continue
            if pruned(trial):
                continue
            if compiles >= max_compiles:
                break
            compile_one(trial)
            if trial.fits:
                break
    for t in trials:
        if t.plan is None:
            t.skipped = ("a setting saving more memory did not fit" if pruned(t) else
                         "ranks below this layout's best fit" if any(
                             u.fits and u.candidate.layout == t.candidate.layout
                             for u in trials) else f"over the {max_compiles}-compile budget")
    return sorted(trials, key=lambda t: (not t.fits, t.plan is None, rank(t)))


def flops_by_remat(cfg: ml_collections.ConfigDict, topology: Target
                   ) -> dict[str, tuple[float, float]]:
    """Each remat policy's step FLOPs (the step's, and what remat recomputes), all devices,
    without compiling: what candidates are ranked by before any is compiled."""
    run = spec.resolve(cfg.copy_and_resolve_references(), topology.devices)
    _, abstract = plan_lib.configured_model(run)
    return {remat: flops.step_flops(abstract, run, remat) for remat in REMATS}


def with_overrides(cfg: ml_collections.ConfigDict,
                   overrides: dict[str, object]) -> ml_collections.ConfigDict:
    new = cfg.copy_and_resolve_references()
    with new.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            new[section][field] = value
    return new


def describe(trials: Sequence[Trial], topology: Target, argv: Sequence[str]) -> str:
    """The table (fits first, best first) and the winner as a ready command line."""
    per = f"{topology.memory_word}/{topology.device_word}"
    lines = [f"suggestions for {topology.describe()} (compiled by {topology.compiler}; ranked by "
             "the compute-bound time at peak bf16, then fewer micro-batches):",
             f"  {'layout':<15}{'remat':<15}{'micro':>6}{per:>12}{'fits':>6}"
             f"{'≤ tokens/s':>13}"]
    for t in trials:
        if t.plan is None:
            continue
        c = t.candidate
        hbm = plan_lib.human_bytes(t.plan.peak_bytes) if t.plan.peak_bytes else "?"
        rate = t.plan.tokens_per_second
        lines.append(f"  {c.layout:<15}{c.remat:<15}{c.accum_steps:>6}{hbm:>12}"
                     f"{'yes' if t.fits else 'no':>6}"
                     f"{f'{rate:,.0f}' if rate is not None else '?':>13}")
    reasons: dict[str, int] = {}
    for t in trials:
        if t.plan is None:
            reasons[t.skipped] = reasons.get(t.skipped, 0) + 1
    if reasons:
        lines.append("  not compiled: " + "; ".join(f"{n} (where {why})"
                                                   for why, n in reasons.items()))
    best = next((t for t in trials if t.fits), None)
    if best is None:
        lines.append(f"nothing fits: try more {topology.device_word}s, a smaller "
                     "train.batch_size or data.max_len, train.param_dtype=bfloat16, LoRA, or a "
                     "4-bit base (lora.base_quant=nf4)")
        return "\n".join(lines)
    lines.append(f"suggested ({plan_lib.human_bytes(best.plan.peak_bytes)} of "
                 f"{plan_lib.human_bytes(best.plan.capacity)} per {topology.device_word}):")
    lines.append("  " + command_line(argv, best.candidate))
    return "\n".join(lines)


PLANNING_FLAGS = ("--dry_run", "--nodry_run", "--suggest", "--nosuggest", "--topology")


def command_line(argv: Sequence[str], c: Candidate) -> str:
    """The training command: `argv` with the candidate's settings in place of the user's, and
    without the planning flags."""
    settings = {f"--config.{k}": v for k, v in c.overrides().items()}
    dropped = {*settings, *PLANNING_FLAGS, *(f"--config.{k}" for k in NO_EXPERT_AXIS)}
    kept = [a for a in argv[1:] if a.split("=", 1)[0] not in dropped]
    program = "python -m jaxft.train"
    return " ".join([program, *map(shlex.quote, kept),
                     *(f"{k}={v}" for k, v in settings.items())])


def print_suggestions(cfg: ml_collections.ConfigDict, topology_name: str | None,
                      argv: Sequence[str] = ()) -> list[Trial]:
    """`--dry_run --topology=… --suggest`."""
    if not topology_name:
        raise JaxftError("--suggest compiles for a TPU slice or GPUs; add --topology (e.g. "
                         "v5e-8 or h100x8)")
    topology = target(topology_name)
    print(f"searching settings for {topology.describe()} "
          f"(at most {MAX_COMPILES} compiles):", flush=True)
    trials = search(cfg, topology, progress=lambda line: print(line, flush=True))
    print(describe(trials, topology, argv or sys.argv))
    return trials
