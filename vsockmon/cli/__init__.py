"""The ``vsockmon`` command: a click group whose commands live in one module per family.

Commands are imported only when invoked: inside the lab VM (qemu TCG) every import costs
seconds, and the capture and echo paths must not pay for scapy, numpy or matplotlib.

Each command parses its options, calls the library (:mod:`vsockmon.api` for captures) and
renders the result. Errors are turned into output here, in one place: a
:class:`~vsockmon.errors.VsockmonError` becomes one line on stderr (``Error: <message>``)
and the command's error status (:data:`ERROR_EXIT`), output that cannot be written (a full
disk) one line too, and a reader that goes away (``| head``) ends the output quietly.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any, NoReturn

import click

from vsockmon import __version__
from vsockmon.errors import VsockmonError

# No command does linear algebra, yet the OpenBLAS that numpy loads starts a worker thread per
# core at import, which cost about 0.1 CPU s per command here (`conns --json` of a small
# capture, medians of 7 runs: 0.32 CPU s, 0.22 with one thread; the same wall time). Set
# before any command module imports numpy; a value the user gave is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

COMMANDS: dict[str, str] = {
    "timeline": "vsockmon.cli.timeline:timeline",
    "stats": "vsockmon.cli.stats:stats",
    "follow": "vsockmon.cli.follow:follow",
    "capture": "vsockmon.cli.capture:capture",
    "doctor": "vsockmon.cli.doctor:doctor",
    "echo": "vsockmon.cli.echo:echo",
    "link": "vsockmon.cli.link:link",
    "conns": "vsockmon.cli.conns:conns",
    "decode": "vsockmon.cli.decode:decode",
    "lab": "vsockmon.cli.lab:lab",
    "export": "vsockmon.cli.export:export",
    "wireshark": "vsockmon.cli.wireshark:wireshark",
    "diagnose": "vsockmon.cli.diagnose:diagnose",
    "top": "vsockmon.cli.top:top",
    "fleet": "vsockmon.cli.fleet:fleet",
}
"""Command name → ``module:attribute`` of its click command."""

ERROR_EXIT: dict[str, int] = {"diagnose": 2}
"""Exit status of a command that fails with a :class:`VsockmonError`, where not 1
(``diagnose`` keeps 1 for "found problems", so a capture it cannot read is 2)."""


def fail(line: str, exit_code: int = 1) -> NoReturn:
    """Print ``line`` on stderr and exit with ``exit_code``: how a command fails."""
    click.echo(line, err=True)
    raise click.exceptions.Exit(exit_code)


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VsockmonError as e:
            fail(f"Error: {e}", _status(ctx))
        except BrokenPipeError:
            sys.stderr.close()  # the reader left (| head): no traceback, no message
        except OSError as e:
            # Output that cannot be written (a full disk, /dev/full, a quota): files we read
            # fail as VsockmonErrors with their names. Any other bare OSError is still one
            # line, but not called a write failure it may not be.
            _drop_stdout()
            where = f"{e.filename}: " if e.filename else (
                "cannot write the output: " if e.errno in _WRITE_ERRNOS else "")
            fail(f"Error: {where}{e.strerror or e}", _status(ctx))


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})
"""The errors of a write that failed for lack of room or a broken medium."""


def _status(ctx: click.Context) -> int:
    """The failing command's error status (known once the group has picked the command)."""
    return ERROR_EXIT.get(ctx.invoked_subcommand or "", 1)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail again
    over the output still buffered (and print a second, noisier error)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (a test's capture): nothing flushes at exit
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vsockmon")
def main() -> None:
    """Capture and analyse Linux virtio-vsock traffic (vsockmon, LINKTYPE_VSOCK 271).

    \b
    Examples:
      vsockmon decode capture.pcap -Y 'cid == 3 and op == RW'
      vsockmon conns capture.pcap
      vsockmon diagnose capture.pcap
      vsockmon timeline capture.pcap --conn 0 --html out.html
      sudo vsockmon capture -w out.pcapng
      vsockmon lab run -- vsockmon doctor
    """
