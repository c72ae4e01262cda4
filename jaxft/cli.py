"""What every `python -m jaxft.<command>` shares: argument checks, quiet logs, one-line errors.

A user-fixable problem (`JaxftError`) ends the command with `error: <one line>` and exit code 1,
never a traceback; Orbax and XLA, which log every save and compile at INFO, are quieted unless
the user asks for `--verbosity`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from absl import app, flags
from absl import logging as absl_logging

from jaxft.errors import JaxftError


def start(argv: list[str]) -> None:
    """Refuse stray positional arguments and quiet library logging."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `JaxftError` into `error: …` on stderr and exit code 1."""
    try:
        yield
    except JaxftError as e:
        sys.exit(f"error: {e}")
