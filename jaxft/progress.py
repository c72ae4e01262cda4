"""Progress bars and time estimates for every wait longer than a few seconds.

Loading weights (tensors and bytes), quantizing, exporting, evaluation passes, the dry run's
compile and training all report through `bar`, a tqdm bar that is shown only when stderr is a
terminal, only on the main process, and never after `--noprogress` (or `enable(False)`). Logs
and CI output therefore stay free of carriage-return noise, and a user at a terminal always sees
that something is happening and how long it will take. tqdm is the ecosystem's bar (datasets,
transformers and huggingface_hub use it), so ours look and behave like theirs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def enable(on: bool) -> None:
    """Turn every bar of this process on or off (`--noprogress` turns them off)."""
    global _enabled
    _enabled = on


def shown() -> bool:
    """Whether bars are drawn: enabled, on the main process, and stderr is a terminal."""
    return _enabled and jax.process_index() == 0 and _is_terminal(sys.stderr)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar(total: float | None = None, *, desc: str, unit: str = "it", initial: int = 0,
        bytes_: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar (a no-op one when not `shown()`); `bytes_` counts bytes with SI prefixes."""
    if bytes_:
        kwargs.update(unit="B", unit_scale=True, unit_divisor=1000)
    else:
        kwargs.setdefault("unit", unit)
    kwargs.setdefault("leave", False)
    disable = kwargs.pop("disable", False) or not shown()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=disable, file=sys.stderr, **kwargs)


def track(items: Iterable[T], *, desc: str, total: int | None = None,
          unit: str = "it") -> Iterator[T]:
    """Iterate `items` with a bar that closes when the iteration ends (or is abandoned)."""
    with bar(total, desc=desc, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)


@contextlib.contextmanager
def datasets_bars_follow() -> Iterator[None]:
    """Within: `datasets`' own bars ("Tokenizing …", "Generating train split") are drawn only
    where jaxft's are; the caller's setting is restored after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not shown():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def waiting(desc: str) -> Iterator[None]:
    """An open-ended wait (a compile): a bar without a total shows the time elapsed."""
    with bar(None, desc=desc, bar_format="{desc}: {elapsed}", leave=True) as b:
        b.refresh()
        yield
