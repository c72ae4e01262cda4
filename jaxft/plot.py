r"""One picture of a training run: `workdir/metrics.png` from `workdir/metrics.jsonl`.

  python -m jaxft.plot --workdir=runs/lora        # writes runs/lora/metrics.png

Four panels: train and eval loss, learning rate, tokens/s and gradient norm, each against the
step; a preference (DPO) run adds a fifth, its reward accuracy and margin, and a GRPO run its
mean reward (sampled, and greedy on the held-out prompts). `jaxft.train`
writes the same file at the end of every run, so a finished workdir can be judged at a glance
without TensorBoard. The figure is drawn on matplotlib's Agg canvas directly
(no pyplot, no global backend switch), at a fixed 12×8 in and 100 dpi: always 1200×800 pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxft.errors import JaxftError
from jaxft.metrics import METRICS_FILE

PLOT_FILE = "metrics.png"
SIZE_INCHES = (12, 8)
DPI = 100
# (panel title, metrics drawn in it)
PANELS = (
    ("loss", ("train_loss", "eval_loss")),
    ("learning rate", ("lr",)),
    ("tokens/s", ("tokens_per_s",)),
    ("gradient norm", ("grad_norm",)),
)
# Preference runs (task 'dpo') add one: how often, and by how much, chosen beats rejected.
REWARD_PANEL = ("rewards: accuracy and margin", ("rewards/accuracies", "eval_rewards/accuracies",
                                                 "rewards/margins", "eval_rewards/margins"))
GRPO_PANEL = ("reward", ("reward", "eval_reward"))  # GRPO: its samples' and the held-out mean


def read_series(workdir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} from metrics.jsonl, sorted by step.

    A resumed run appends the steps it repeats again; the last value written for a step wins,
    so the curves show what the surviving run did.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise JaxftError(f"{path}: no such file (is {workdir} a jaxft.train workdir?)")
    by_metric: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise JaxftError(f"{path}:{number}: not a metrics record with a step "
                             f"({type(e).__name__})") from e
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                by_metric.setdefault(name, {})[step] = float(value)
    if not by_metric:
        raise JaxftError(f"{path}: holds no metrics yet (train for at least one logged step)")
    return {name: (sorted(points), [points[s] for s in sorted(points)])
            for name, points in by_metric.items()}


def plot_metrics(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's curves to `out` (default `workdir/metrics.png`); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_series(workdir)
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    panels = PANELS + tuple(panel for panel in (REWARD_PANEL, GRPO_PANEL)
                            if any(n in series for n in panel[1]))
    axes = list(fig.subplots(2, 2 if len(panels) <= 4 else 3).flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes, panels, strict=False):  # unused axes hidden
        drawn = [n for n in names if n in series]
        for name in drawn:
            steps, values = series[name]
            # eval points are sparse: markers keep a one-point curve (base model only) visible
            sparse = name.startswith("eval") or len(steps) == 1
            ax.plot(steps, values, marker="o" if sparse else None,
                    markersize=4, label=name.replace("_", " "))
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if len(drawn) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(workdir).resolve().name))
    fig.tight_layout()
    path = Path(out) if out is not None else Path(workdir) / PLOT_FILE
    fig.savefig(path, dpi=DPI, format="png")
    return path


def main(argv: list[str]) -> None:
    from absl import app, flags

    from jaxft import cli

    cli.start(argv)
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    with cli.user_errors():
        path = plot_metrics(f.workdir, f.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    from absl import app, flags

    from jaxft import cli

    flags.DEFINE_string("workdir", None, "A jaxft.train workdir (reads its metrics.jsonl).")
    flags.DEFINE_string("out", None, "PNG to write (default: <workdir>/metrics.png).")
    app.run(main, flags_parser=cli.parse_flags)
