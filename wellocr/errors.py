"""The one exception type for mistakes a user can fix.

Entry points catch `UserError`, print its one-line message (no traceback) and exit with code 2.
"""


class UserError(Exception):
    """A bad config, file, data row or environment that the user can fix; the message names it and the fix."""
