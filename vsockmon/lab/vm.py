"""What the lab VM is told and what it says: the job file, qemu's command line, the console.

The host describes a run as a :class:`Job`; :func:`job_script` turns it into the shell file
the guest's /init sources (see ``init.sh``), :func:`qemu_argv` into qemu's arguments, and a
:class:`ConsoleFilter` separates the command's output from the init's markers and the
kernel's noise. This module does no I/O.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SHARED_DIRS: tuple[str, ...] = ("usr", "etc", "root", "home", "opt", "srv", "var", "work")
"""Top-level host directories the guest sees read-only (when the host has them)."""
MERGED_USR: tuple[str, ...] = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")
"""Top-level names that are symlinks into /usr on Debian 12 (bound if they are directories)."""

STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_PORT = 9000
"""Base port of the nested guest's services (see ``lab-guest.c``)."""
GUEST_BOOT_S = 300
"""How long the lab VM waits for the nested guest to say it is ready before booting it again
(TCG inside TCG: about a minute idle, several when the machine is loaded)."""
GUEST_LOG = "/run/vsockmon-lab/guest.log"
"""Where the lab VM writes the nested guest's console."""
GUEST_MONITOR = "/run/vsockmon-lab/guest-monitor.sock"
"""The nested guest's qemu monitor (HMP), a Unix socket (init.sh starts qemu with it)."""
GUEST_KERNEL_ROOT = "/lab/kernel"
"""Where the guest sees the kernel package's tree (``modprobe -d /lab/kernel MODULE``)."""

KERNEL_ARGS = "console=ttyS0 quiet loglevel=3 panic=-1 no_timer_check"
"""Quiet: kernel messages would mix with the command's output on the serial console.
``no_timer_check``: under emulation on a busy host the kernel's early check of the timer
interrupt can miss it and panic ("IO-APIC + timer doesn't work") before /init."""


@dataclass(frozen=True)
class HostLayout:
    """Which host directories the guest binds read-only and which symlinks it recreates."""

    binds: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    extra: tuple[str, ...] = ()
    """Absolute paths outside ``binds``, bound read-only at the same place: the venv and
    vsockmon's own tree when they live elsewhere (a clone in /tmp, a CI work directory)."""


def host_layout(top_level: Mapping[str, str | None], needed: Sequence[str] = ()
                ) -> HostLayout:
    """The guest's view of the host's ``/``, from its top-level directories and symlinks.

    ``top_level`` maps a name in ``/`` to its symlink target, or None for a directory.
    Only a known list is shared: the host's ``/dev``, ``/proc`` and whatever else lives in
    ``/`` stay out of the guest — except the resolved absolute paths in ``needed`` that
    the shared directories do not already hold.
    """
    binds = [name for name in SHARED_DIRS if name in top_level and top_level[name] is None]
    links = []
    for name in MERGED_USR:
        if name not in top_level:
            continue
        target = top_level[name]
        if target is None:
            binds.append(name)
        else:
            links.append((name, target))
    return HostLayout(tuple(binds), tuple(links), _outside(needed, binds))


def _outside(needed: Sequence[str], binds: Sequence[str]) -> tuple[str, ...]:
    """The paths of ``needed`` not under a bound top-level directory, without ones that
    lie inside another (binding the outer one shows both)."""
    paths = sorted({Path(p) for p in needed if Path(p).parts[1:2] not in [(b,) for b in binds]})
    kept: list[Path] = []
    for path in paths:
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return tuple(str(p) for p in kept)


@dataclass(frozen=True)
class Job:
    """One command to run in the lab VM, as the guest's /init needs it."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    layout: HostLayout
    kernel_root: str
    qemu: str
    """The host's qemu, which the lab VM runs to boot the nested guest."""
    guest_cid: int | None = None
    guest_transport: bool = True
    """False: the nested guest does not load its vsock transport driver."""
    shell: bool = False
    terminal_size: tuple[int, int] | None = None
    guest_boot_s: int = GUEST_BOOT_S
    """How long the nested guest may take to get ready before it is booted once more."""


def guest_env(
    venv: str | None, term: str, guest_cid: int | None, extra: Mapping[str, str]
) -> dict[str, str]:
    """The command's whole environment in the guest: clean, with the host's venv first.

    The venv's interpreter is a symlink to the host's /usr/bin/python3, which the guest
    sees through the shared /usr, so ``vsockmon`` and ``python`` work unchanged.
    """
    env = {
        "PATH": f"{venv}/bin:{STANDARD_PATH}" if venv else STANDARD_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": term,
        "VSOCKMON_LAB": "1",
        "VSOCKMON_LAB_KERNEL_ROOT": GUEST_KERNEL_ROOT,
    }
    if venv:
        env["VIRTUAL_ENV"] = venv
    if guest_cid is not None:
        env["VSOCKMON_LAB_GUEST_CID"] = str(guest_cid)
        env["VSOCKMON_LAB_GUEST_PORT"] = str(GUEST_PORT)
        env["VSOCKMON_LAB_GUEST_LOG"] = GUEST_LOG
        env["VSOCKMON_LAB_GUEST_MONITOR"] = GUEST_MONITOR
    env.update(extra)
    return env


def job_script(job: Job) -> str:
    """The shell file the guest's /init sources: LAB_* settings and ``lab_command``.

    ``lab_command`` execs the command under ``env -i`` so nothing of the init's
    environment leaks into it; a shell additionally gets the terminal as its controlling
    tty (``setsid -c``) and the host terminal's size.
    """
    q = shlex.quote
    # The host's env, not busybox's: busybox runs its own applets in place of commands
    # of the same name (its sh and ip would shadow the host's).
    command = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in job.env.items()), *job.argv]
    body = ("exec /lab/bin/setsid -c " if job.shell else "exec ") + shlex.join(command)
    if job.shell and job.terminal_size:
        rows, cols = job.terminal_size
        body = f"/lab/bin/stty rows {rows} cols {cols}\n  {body}"
    lines = [
        f"LAB_MODE={'shell' if job.shell else 'run'}",
        f"LAB_CWD={q(job.cwd)}",
        f"LAB_BINDS={q(' '.join(job.layout.binds))}",
        f"LAB_LINKS={q(' '.join(f'{name}:{target}' for name, target in job.layout.links))}",
        f"LAB_EXTRA_BINDS={q(' '.join(job.layout.extra))}",
        f"LAB_KERNEL_ROOT={q(job.kernel_root)}",
        f"LAB_QEMU={q(job.qemu)}",
        f"LAB_GUEST_CID={'' if job.guest_cid is None else job.guest_cid}",
        f"LAB_GUEST_PORT={GUEST_PORT}",
        f"LAB_GUEST_BOOT_S={job.guest_boot_s}",
        f"LAB_GUEST_TRANSPORT={'on' if job.guest_transport else 'off'}",
        "lab_command() {",
        f"  {body}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _qemu_path(path: str | Path) -> str:
    """A path as a qemu option value: commas are doubled."""
    return str(path).replace(",", ",,")


@dataclass(frozen=True)
class Machine:
    """What qemu boots and how: the lab's kernel and initramfs, accelerator, terminals."""

    qemu: str
    kernel: Path
    initrd: Path
    accel: str
    memory: str
    cwd: str
    kernel_args: str
    stderr_path: str | None
    """Where the guest's second serial port (the command's stderr) goes; None: nowhere."""
    interactive: bool = False


def qemu_argv(m: Machine) -> list[str]:
    """qemu's arguments: no NIC, the serial console on stdio, two 9p shares.

    ``/`` is shared read-only (the guest binds parts of it and then unmounts it); the
    working directory read-write. ``multidevs=remap`` keeps inode numbers unique across
    the host's mounts. An interactive console passes Ctrl-C to the guest (signal=off).
    """
    err = f"file,id=err,path={_qemu_path(m.stderr_path)}" if m.stderr_path else "null,id=err"
    share = "security_model=none,multidevs=remap"
    return [
        m.qemu,
        "-accel",
        m.accel,
        "-cpu",
        "max",
        "-m",
        m.memory,
        "-smp",
        "2",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-chardev",
        "stdio,id=con,signal=off,mux=on" if m.interactive else "stdio,id=con",
        "-serial",
        "chardev:con",
        "-chardev",
        err,
        "-serial",
        "chardev:err",
        "-kernel",
        str(m.kernel),
        "-initrd",
        str(m.initrd),
        "-append",
        m.kernel_args,
        "-virtfs",
        f"local,path=/,mount_tag=host,readonly=on,{share}",
        "-virtfs",
        f"local,path={_qemu_path(m.cwd)},mount_tag=cwd,{share}",
    ]


def kernel_args(nonce: str | None, job_path: str) -> str:
    """The kernel command line: quiet console, no reboot on panic, the init's two settings."""
    args = f"{KERNEL_ARGS} vsockmon_lab.job={job_path}"
    return f"{args} vsockmon_lab.nonce={nonce}" if nonce else args


_MARKER_PREFIX = b"@@VSOCKMON-LAB-"
_DIAGNOSTIC_TAIL = 4096


class ConsoleFilter:
    """Splits the serial console into the command's output and the init's markers.

    Bytes before the BOOT marker are the kernel's (kept, bounded, for error messages);
    bytes after EXIT are the power-off's (dropped). A marker may arrive in pieces, so a
    possible beginning of one is held back until the next chunk decides.
    """

    def __init__(self, nonce: str) -> None:
        self._marker = re.compile(
            re.escape(_MARKER_PREFIX) + rb"([A-Z]+):" + nonce.encode() + rb":([^@]*)@@"
        )
        self._pending = b""
        self.booted = False
        self.started = False
        self.exit_code: int | None = None
        self.error: str | None = None
        self.kernel_output = b""

    @property
    def done(self) -> bool:
        return self.exit_code is not None or self.error is not None

    def feed(self, data: bytes) -> bytes:
        """Takes a chunk of console bytes; returns the command's output in it."""
        buf = self._pending + data
        out = []
        while (match := self._marker.search(buf)) is not None:
            out.append(self._route(buf[: match.start()]))
            self._on_marker(match.group(1).decode(), match.group(2).decode(errors="replace"))
            buf = buf[match.end() :]
        keep = _partial_marker_length(buf)
        self._pending = buf[len(buf) - keep :] if keep else b""
        out.append(self._route(buf[: len(buf) - keep]))
        return b"".join(out)

    def _route(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if not self.booted:
            self.kernel_output = (self.kernel_output + data)[-_DIAGNOSTIC_TAIL:]
            return b""
        return data

    def _on_marker(self, kind: str, value: str) -> None:
        if kind == "BOOT":
            self.booted = True
        elif kind == "START":
            self.started = True
        elif kind == "EXIT":
            self.exit_code = int(value)
        elif kind == "ERROR":
            self.error = value


def _partial_marker_length(buf: bytes) -> int:
    """How many bytes at the end of ``buf`` may begin a marker not yet complete."""
    start = buf.rfind(_MARKER_PREFIX)
    if start != -1 and len(buf) - start < 512:
        return len(buf) - start
    for n in range(min(len(_MARKER_PREFIX) - 1, len(buf)), 0, -1):
        if _MARKER_PREFIX.startswith(buf[-n:]):
            return n
    return 0


def command_argv(cmd: str | Sequence[str]) -> tuple[str, ...]:
    """A command as argv: a string runs under ``sh -c``."""
    return ("sh", "-c", cmd) if isinstance(cmd, str) else tuple(cmd)
