"""Output files for the commands: the ``--force`` option and the checks it lifts.

The rule itself lives in :mod:`vsockmon.output` (the library's exports obey it too); this
module adds the option, so every command words it alike. Light imports only (click and the
standard library): the capture command uses it inside the lab VM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from vsockmon.output import OutputError, create_output, refuse_existing, write_output

__all__ = ["OutputError", "create_output", "force_option", "refuse_existing", "write_output"]

F = TypeVar("F", bound=Callable[..., object])


def force_option(help: str = "Overwrite OUT if it exists.") -> Callable[[F], F]:
    """The ``--force`` flag (parameter ``force``)."""
    return click.option("--force", is_flag=True, help=help)
