"""The one exception type users see.

Every problem a user can fix (a missing file, a misnamed column, a tensor of the wrong shape) is
raised as a `JaxftError` whose message is a single line naming the culprit and what was expected.
The command-line entry points print that line and exit non-zero instead of a traceback.
"""


class JaxftError(ValueError):
    """A user-fixable problem, described in one line."""
