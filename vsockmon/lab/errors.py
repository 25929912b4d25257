"""The lab's error types: each carries one line the CLI prints as is."""

from __future__ import annotations

from vsockmon.errors import VsockmonError


class LabError(VsockmonError):
    """The lab could not be built or booted; ``str(error)`` is one line for the user."""


class LabTimeout(LabError):
    """The command did not finish in time; qemu has been killed."""
