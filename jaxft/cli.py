"""What every `python -m jaxft.<command>` shares: argument checks, quiet logs, one-line errors.

A user-fixable problem (`JaxftError`) ends the command with `error: <one line>` and exit code 1,
never a traceback; so does a bad flag, including a `--config.<field>` override that names no
field (ml_collections raises that from inside absl's flag parsing, with its "did you mean" hint
buried in a traceback). Orbax and XLA, which log every save and compile at INFO, are quieted
unless the user asks for `--verbosity`.
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
from collections.abc import Iterator

from absl import app, flags
from absl import logging as absl_logging

from jaxft import progress
from jaxft.errors import JaxftError


def start(argv: list[str]) -> None:
    """Refuse stray positional arguments, quiet library logging, honour `--noprogress`."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    progress.enable(flags.FLAGS.progress)


def define_progress_flag() -> None:
    """`--progress` / `--noprogress`, which every command has (defined once, when parsing)."""
    if "progress" not in flags.FLAGS:
        flags.DEFINE_bool("progress", True, "Progress bars and time estimates on a terminal "
                          "(--noprogress: none; never drawn when stderr is not a terminal).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), every refusal in one
    line: `error: …` and exit code 1."""
    define_progress_flag()
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        sys.exit(f"error: {unknown_field(argv, e)}")


def unknown_field(argv: list[str], error: Exception) -> str:
    """'config: optim.lrr is not a field (did you mean optim.lr?)' from ml_collections' error
    for `--config.optim.lrr=…`, whose message is the missing key repr'd once or twice over."""
    text = str(error)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            break
    key = text.splitlines()[0].strip("'\"") if text else ""
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        flag, _, path = name.partition(".")
        parts = path.split(".")
        if path and key in parts:
            field = ".".join(parts[: parts.index(key) + 1])
            parent = field.rpartition(".")[0]
            suggestion = f"{parent}.{hint.group(1)}" if parent and hint else \
                hint.group(1) if hint else ""
            return (f"{flag}: {field} is not a field" + (f" (in --{name})" if field != path
                                                          else "")
                    + (f" (did you mean {suggestion}?)" if suggestion else ""))
    return f"config override names no field: {key or text}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `JaxftError` into `error: …` on stderr and exit code 1."""
    try:
        yield
    except JaxftError as e:
        sys.exit(f"error: {e}")
