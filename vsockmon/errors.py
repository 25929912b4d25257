"""The one root of every error vsockmon raises on purpose.

A script catches :class:`VsockmonError` and gets every failure the library reports as one
line for a user (a capture that cannot be read, a link that cannot be made, a bad filter);
the CLI turns it into that line and an exit status in one place. Anything else escaping the
library is a bug.
"""

from __future__ import annotations


class VsockmonError(Exception):
    """A failure to report to the user as one line: the message says what and where."""
