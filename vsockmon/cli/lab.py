"""``vsockmon lab``: build the lab VM, run commands in it, open a shell in it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

import click

from vsockmon.cli import fail
from vsockmon.lab import Lab, LabError, LabTimeout
from vsockmon.lab import build as lab_build

ACCELS = click.Choice(["tcg", "kvm", "auto"])


@contextmanager
def _errors(command: str) -> Iterator[None]:
    """Turns the lab's errors and Ctrl-C into one line (naming the command, never a
    traceback) and an exit status: 124 for a timeout, as timeout(1) does, 130 for Ctrl-C."""
    try:
        yield
    except LabTimeout as error:
        fail(f"{command}: {error}", 124)
    except LabError as error:
        fail(f"{command}: {error}")
    except KeyboardInterrupt:
        fail(f"{command}: interrupted; qemu killed", 130)


def _say(command: str) -> Callable[[str], None]:
    return lambda message: click.echo(f"{command}: {message}", err=True)


def _stream(out: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    return write


def _environment(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="-e")
        env[key] = value
    return env


def _lab(command: str, kernel: str | None) -> Lab:
    """The built lab; builds it first (with progress) when the cache lacks it."""
    return Lab.build(_say(f"{command}: building the lab"), kernel)


_KERNEL = click.option(
    "--kernel",
    metavar="VERSION",
    help="A Debian kernel: a series (6.1, 6.12), a version (6.12.117) or a release "
         "(6.1.0-57-amd64); the newest match in Debian's archive. Default: Debian 12's.",
)


@click.group()
def lab() -> None:
    """A real Debian kernel with vsockmon under qemu, for tests and fixtures.

    \b
    Examples:
      vsockmon lab build
      vsockmon lab build --kernel 6.12
      vsockmon lab kernels
      vsockmon lab run -- sh -c 'ip link add type vsockmon && ip -d link show vsockmon0'
      vsockmon lab run --kernel 6.12 -- uname -r
      vsockmon lab run --guest-cid 3 -- python3 my_host_guest_test.py
      vsockmon lab shell
    """


@lab.command()
@click.option(
    "--package",
    default=lab_build.KERNEL_META_PACKAGE,
    show_default=True,
    help="A Debian image package, or a meta package whose dependency names one.",
)
@_KERNEL
def build(package: str, kernel: str | None) -> None:
    """Download Debian's kernel and build the lab's images (cached; prints the cache dir).

    Each kernel is cached side by side; building one leaves the others as they are.
    """
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        _say("lab build")(message)

    with _errors("lab build"):
        files = lab_build.build(package, progress, kernel)
    if not said:
        _say("lab build")(f"cached: kernel {files.kernel_version}")
    click.echo(files.dir)


@lab.command()
def kernels() -> None:
    """List the kernel series Debian's archive has (newest of each) and the cached kernels.

    \b
    Example:
      vsockmon lab kernels
    """
    with _errors("lab kernels"):
        series = lab_build.available()
        held = [(files, lab_build.fresh(files)) for files in lab_build.cached()]
    click.echo("available (Debian's archive, newest of each series):")
    for name, package in series.items():
        click.echo(f"  {name:<6} {package}")
    click.echo(f"cached ({lab_build.cache_root()}):")
    for files, fresh in held:
        click.echo(f"  {files.kernel_version:<24} {'built' if fresh else 'not built'}")
    if not held:
        click.echo("  none: vsockmon lab build [--kernel VERSION]")


@lab.command()
@_KERNEL
def status(kernel: str | None) -> None:
    """Show what the cache holds for a kernel; exit 1 if the lab is not built."""
    with _errors("lab status"):
        files, fresh = lab_build.status(kernel_spec=kernel)
    click.echo(f"kernel:  {files.kernel_version}")
    click.echo(f"cache:   {files.dir}")
    for path in files.products():
        size = f"{path.stat().st_size / 1e6:8.1f} MB" if path.is_file() else "   missing"
        click.echo(f"  {size}  {path.relative_to(files.dir)}")
    click.echo(f"state:   {'built' if fresh else 'not built: run `vsockmon lab build`'}")
    if not fresh:
        sys.exit(1)


def _shared_options(func: Callable[..., None]) -> Callable[..., None]:
    options = [
        _KERNEL,
        click.option(
            "--guest-cid",
            type=int,
            help="Boot a nested guest with this CID (3+) first; see docs/lab.md.",
        ),
        click.option(
            "--guest-no-transport",
            is_flag=True,
            help="Boot the nested guest without its vsock transport driver.",
        ),
        click.option(
            "--accel",
            type=ACCELS,
            default="tcg",
            show_default=True,
            help="auto: KVM if it boots within 20 s, else TCG.",
        ),
        click.option(
            "-e",
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            help="Set an environment variable for the command (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@lab.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Kill the VM after this many seconds (exit status 124).",
)
@_shared_options
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    timeout: float,
    kernel: str | None,
    guest_cid: int | None,
    guest_no_transport: bool,
    accel: str,
    env: Sequence[str],
    cmd: Sequence[str],
) -> None:
    """Run CMD as root in a fresh lab VM, in this directory; exit with its status.

    The guest sees the host's /usr, /etc, /root, /home, /opt, /srv, /var and /work
    read-only and this directory read-write, so the venv's vsockmon, tcpdump and tshark
    work there. CMD's stdout and stderr stream here; its stdin is empty.
    """
    with _errors("lab run"):
        result = _lab("lab run", kernel).run(
            list(cmd),
            env=_environment(env),
            timeout=timeout,
            guest_cid=guest_cid,
            guest_transport=not guest_no_transport,
            accel=accel,
            stdout=_stream(sys.stdout.buffer),
            stderr=_stream(sys.stderr.buffer),
            notify=_say("lab run"),
        )
    sys.exit(result.returncode)


@lab.command()
@_shared_options
def shell(kernel: str | None, guest_cid: int | None, guest_no_transport: bool, accel: str,
          env: Sequence[str]) -> None:
    """An interactive root shell in the lab VM on this terminal (exit powers it off).

    Ctrl-C goes to the guest; Ctrl-A X kills the VM from outside.
    """
    with _errors("lab shell"):
        sys.exit(
            _lab("lab shell", kernel).shell(
                env=_environment(env),
                guest_cid=guest_cid,
                guest_transport=not guest_no_transport,
                accel=accel,
            )
        )
