"""The one exception type users see, and the two ways jaxft phrases a problem.

Every problem a user can fix (a missing file, a misnamed column, a tensor of the wrong shape) is
raised as a `JaxftError` whose message is a single line naming the culprit and what was expected.
The command-line entry points print that line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

# How many of a collected list of problems one message spells out; the rest are counted.
MAX_LISTED_PROBLEMS = 8


class JaxftError(ValueError):
    """A user-fixable problem, described in one line."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, what a one-line error quotes of a library's exception
    (their messages often run to pages: a traceback of their own, a hint, a usage text)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def collected(source: str, problems: Sequence[str]) -> JaxftError:
    """One error for every problem found in `source`, so a user fixes them all in one go."""
    more = len(problems) - MAX_LISTED_PROBLEMS
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    return JaxftError(f"{source}: {listed}" + (f"; and {more} more" if more > 0 else ""))
