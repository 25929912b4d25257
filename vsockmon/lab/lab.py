"""Running commands in the lab VM: qemu as a child that never outlives its caller.

qemu runs in a session of its own with PR_SET_PDEATHSIG, and every way out of a run (the
command's end, a timeout, Ctrl-C, an exception) kills its process group, so no VM is left
behind even when the host process itself is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import vsockmon
from vsockmon.lab import build as lab_build
from vsockmon.lab.errors import LabError, LabTimeout
from vsockmon.lab.vm import (
    GUEST_BOOT_S,
    MERGED_USR,
    SHARED_DIRS,
    ConsoleFilter,
    Job,
    Machine,
    command_argv,
    guest_env,
    host_layout,
    job_script,
    kernel_args,
    qemu_argv,
)

Sink = Callable[[bytes], None]
Notify = Callable[[str], None]

KVM_BOOT_WATCHDOG = 20.0
"""Seconds KVM gets to reach /init before ``accel="auto"`` falls back to TCG: under a
nested, pagetable-based KVM a stock kernel can crawl for many minutes."""
POWER_OFF_GRACE = 15.0
"""Seconds qemu gets to power off once the command has finished."""
_PR_SET_PDEATHSIG = 1
_DIAGNOSTIC_TAIL = 4096


@dataclass(frozen=True)
class RunResult:
    """A command's outcome in the lab VM.

    ``stdout``/``stderr`` are empty when they were streamed to a sink instead.
    """

    returncode: int
    stdout: str
    stderr: str
    accel: str
    boot_seconds: float
    """From starting qemu to the command's start."""
    seconds: float
    """From starting qemu to its end."""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class _BootStalled(Exception):
    """The guest did not reach /init before the boot watchdog."""


class _KernelPanicked(Exception):
    """The kernel panicked before the init started, so nothing of the command ran: an
    emulated boot that fails once in hundreds (seen on CI's TCG) may simply be booted again."""


def _die_with_parent(parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def _spawn(argv: Sequence[str], stdin: int | None = None, stdout: int | None = None,
           stderr: int | None = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=pass_fds,
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _accels(accel: str) -> list[str]:
    if accel not in ("tcg", "kvm", "auto"):
        raise LabError(f"unknown accelerator {accel!r}; use tcg, kvm or auto")
    if accel != "auto":
        return [accel]
    return ["kvm", "tcg"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["tcg"]


def _top_level() -> dict[str, str | None]:
    """The host's top-level names the guest may see: symlink target, or None for a dir."""
    found: dict[str, str | None] = {}
    for name in (*SHARED_DIRS, *MERGED_USR):
        path = Path("/", name)
        if path.is_symlink():
            found[name] = os.readlink(path)
        elif path.is_dir():
            found[name] = None
    return found


def _shared_cwd(cwd: str | os.PathLike[str] | None) -> str:
    path = Path(cwd or os.getcwd()).resolve()
    if path == Path("/"):
        raise LabError("cannot share / read-write; run from a project directory")
    return str(path)


def _needed_paths() -> list[str]:
    """What the guest must see wherever it lives: the venv, and the tree vsockmon is
    imported from (an editable install's source). The init splits the list on spaces."""
    paths = [str(Path(vsockmon.__file__).resolve().parents[1])]
    venv = _venv()
    if venv:
        paths.append(str(Path(venv).resolve()))
    for path in paths:
        if any(c.isspace() for c in path):
            raise LabError(f"{path}: the lab cannot share a path with white space in it")
    return paths


def _venv() -> str | None:
    """The running venv, which the guest puts first on PATH (it sees it read-only)."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


@contextlib.contextmanager
def _job_file(job: Job) -> Iterator[str]:
    """The job file in a private directory the guest reads through the share of ``/``."""
    with tempfile.TemporaryDirectory(prefix="vsockmon-lab-") as tmp:
        path = Path(tmp, "job.sh")
        path.write_text(job_script(job))
        yield str(path)


class Lab:
    """A built lab: boots its kernel under qemu to run commands on the host's userland."""

    def __init__(self, files: lab_build.LabFiles) -> None:
        self.files = files
        self.qemu = lab_build.which("qemu-system-x86_64") or "qemu-system-x86_64"
        self.guest_boot_s = GUEST_BOOT_S
        """Seconds the nested guest gets to be ready (then one more boot; see docs/lab.md)."""

    @classmethod
    def build(cls, progress: Notify | None = None, kernel: str | None = None) -> Lab:
        """Builds the lab, or finds it cached (see :func:`vsockmon.lab.build.build`);
        ``kernel`` picks a Debian kernel by series or release (``6.12``), else Debian 12's."""
        return cls(lab_build.build(progress=progress or (lambda _: None), kernel_spec=kernel))

    @property
    def kernel(self) -> str:
        """The release the lab boots (``uname -r`` inside it)."""
        return self.files.kernel_version

    def _job(
        self,
        cmd: Sequence[str],
        cwd: str,
        env: Mapping[str, str],
        term: str,
        guest_cid: int | None,
        shell: bool = False,
        guest_transport: bool = True,
    ) -> Job:
        if guest_cid is not None and not 3 <= guest_cid < 0xFFFFFFFF:
            raise LabError(f"guest CID {guest_cid} is reserved; use 3 or more")
        if not guest_transport and guest_cid is None:
            raise LabError("a nested guest without transport needs a guest CID")
        size = os.get_terminal_size(0) if shell and os.isatty(0) else None
        if size is not None and 0 in size:  # a terminal that never said its size
            size = None
        return Job(
            argv=tuple(cmd),
            cwd=cwd,
            env=guest_env(_venv(), term, guest_cid, env),
            layout=host_layout(_top_level(), _needed_paths()),
            kernel_root=str(self.files.kernel_root),
            qemu=self.qemu,
            guest_cid=guest_cid,
            guest_transport=guest_transport,
            shell=shell,
            terminal_size=(size.lines, size.columns) if size else None,
            guest_boot_s=self.guest_boot_s,
        )

    def _machine(self, job: Job, accel: str, args: str, stderr_path: str | None) -> Machine:
        nested = job.guest_cid is not None
        return Machine(
            qemu=self.qemu,
            kernel=self.files.vmlinuz,
            initrd=self.files.nested_initrd if nested else self.files.initrd,
            accel=accel,
            memory="2G" if nested else "1G",
            cwd=job.cwd,
            kernel_args=args,
            stderr_path=stderr_path,
            interactive=job.shell,
        )

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        guest_cid: int | None = None,
        guest_transport: bool = True,
        accel: str = "tcg",
        stdout: Sink | None = None,
        stderr: Sink | None = None,
        notify: Notify | None = None,
    ) -> RunResult:
        """Runs ``cmd`` as root in a fresh lab VM and returns its exit code and output.

        ``cmd`` is an argv, or a string for ``sh -c``. It runs in ``cwd`` (default: the
        current directory), which the guest shares read-write: files it writes there are
        on the host when this returns. ``guest_cid`` boots a nested guest with that CID
        first (see docs/lab.md); ``guest_transport=False`` boots it without its vsock
        transport driver. Output goes to the sinks as it comes, else into the result.
        Raises LabTimeout after ``timeout`` seconds, LabError when the VM fails.
        """
        job = self._job(
            command_argv(cmd),
            _shared_cwd(cwd),
            env or {},
            "dumb",
            guest_cid,
            guest_transport=guest_transport,
        )
        say = notify or (lambda _: None)
        out: list[bytes] = []
        err: list[bytes] = []
        with _job_file(job) as job_path:
            for attempt in _accels(accel):
                watchdog = KVM_BOOT_WATCHDOG if attempt == "kvm" and accel == "auto" else None
                try:
                    code, boot, seconds = self._boot_past_a_panic(
                        say,
                        job,
                        attempt,
                        job_path,
                        timeout,
                        watchdog,
                        stdout or out.append,
                        stderr or err.append,
                    )
                except _BootStalled:
                    say(f"KVM did not boot in {KVM_BOOT_WATCHDOG:g} s; falling back to TCG")
                    continue
                if accel == "auto":
                    say(f"accelerator: {attempt}")
                text = b"".join(out).decode(errors="replace")
                return RunResult(
                    code, text, b"".join(err).decode(errors="replace"), attempt, boot, seconds
                )
        raise LabError("no accelerator could boot the lab VM")

    def _boot_past_a_panic(
        self, say: Notify, job: Job, accel: str, job_path: str, timeout: float,
        watchdog: float | None, out: Sink, err: Sink,
    ) -> tuple[int, float, float]:
        """Boots; a kernel that panics before the init is booted once more, not twice."""
        try:
            return self._boot(job, accel, job_path, timeout, watchdog, out, err)
        except _KernelPanicked as first:
            say(f"the lab kernel panicked before its init started ({first}); booting once more")
        try:
            return self._boot(job, accel, job_path, timeout, watchdog, out, err)
        except _KernelPanicked as second:
            raise LabError(
                f"the lab kernel panicked twice before its init started: {second}"
            ) from None

    def _boot(
        self,
        job: Job,
        accel: str,
        job_path: str,
        timeout: float,
        watchdog: float | None,
        out: Sink,
        err: Sink,
    ) -> tuple[int, float, float]:
        """Boots once, streams the command's output; returns (code, boot s, total s)."""
        nonce = secrets.token_hex(8)
        err_r, err_w = os.pipe()
        machine = self._machine(job, accel, kernel_args(nonce, job_path), f"/dev/fd/{err_w}")
        start = time.monotonic()
        proc = _spawn(
            qemu_argv(machine),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(err_w,),
        )
        os.close(err_w)
        console = ConsoleFilter(nonce)
        try:
            qemu_says, started_at, timed_out = _pump(
                proc, console, err_r, start + timeout, watchdog and start + watchdog, out, err
            )
        finally:
            _kill(proc)
            os.close(err_r)
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        seconds = time.monotonic() - start
        if console.exit_code is not None:
            return console.exit_code, started_at - start, seconds
        if console.error is not None:
            raise LabError(f"the lab VM failed: {console.error}")
        if timed_out:
            where = "while the command ran" if console.started else "before the command started"
            raise LabTimeout(f"timed out after {timeout:g} s {where}; qemu killed")
        if not console.booted and watchdog is not None:
            raise _BootStalled
        panic = _panic_line(console.kernel_output)
        if panic and not console.booted:
            raise _KernelPanicked(panic)
        why = _last_line(qemu_says) or _last_line(console.kernel_output) or "no output"
        raise LabError(f"qemu exited (status {proc.returncode}) before the command finished: {why}")

    def shell(
        self,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        guest_cid: int | None = None,
        guest_transport: bool = True,
        accel: str = "tcg",
    ) -> int:
        """An interactive login shell in the lab VM on this terminal; returns qemu's status.

        Ctrl-C goes to the guest; ``exit`` (or Ctrl-D) powers the VM off. ``auto`` means
        TCG here: a console gives the boot watchdog no marker to wait for.
        """
        term = os.environ.get("TERM", "linux")
        job = self._job(
            ("/bin/bash", "-l"),
            _shared_cwd(cwd),
            env or {},
            term,
            guest_cid,
            shell=True,
            guest_transport=guest_transport,
        )
        saved = termios.tcgetattr(0) if os.isatty(0) else None
        with _job_file(job) as job_path:
            machine = self._machine(job, _accels(accel)[-1], kernel_args(None, job_path), None)
            proc = _spawn(qemu_argv(machine))
            try:
                return proc.wait()
            finally:
                _kill(proc)
                if saved is not None:  # qemu restores the terminal, unless it was killed
                    termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _pump(
    proc: subprocess.Popen[bytes],
    console: ConsoleFilter,
    err_fd: int,
    deadline: float,
    boot_deadline: float | None,
    out: Sink,
    err: Sink,
) -> tuple[bytes, float, bool]:
    """Relays the guest's console and stderr until qemu ends or a deadline passes.

    Returns qemu's own messages (tail), when the command started, and whether the
    deadline passed. After the EXIT marker qemu gets POWER_OFF_GRACE to power off.
    """
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "console")
        sel.register(err_fd, selectors.EVENT_READ, "stderr")
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "qemu")
        return _relay(sel, console, deadline, boot_deadline, out, err)


def _relay(
    sel: selectors.BaseSelector,
    console: ConsoleFilter,
    deadline: float,
    boot_deadline: float | None,
    out: Sink,
    err: Sink,
) -> tuple[bytes, float, bool]:
    qemu_says = b""
    started_at = done_at = 0.0
    while sel.get_map():
        now = time.monotonic()
        limit = deadline
        if boot_deadline is not None and not console.booted:
            limit = min(limit, boot_deadline)
        if done_at:
            limit = min(limit, done_at + POWER_OFF_GRACE)
        if now >= limit:
            return qemu_says, started_at or now, limit == deadline
        for key, _ in sel.select(limit - now):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
            elif key.data == "console":
                shown = console.feed(data)
                if shown:
                    out(shown)
                if console.started and not started_at:
                    started_at = time.monotonic()
                if console.done and not done_at:
                    done_at = time.monotonic()
            elif key.data == "stderr":
                err(data)
            else:
                qemu_says = (qemu_says + data)[-_DIAGNOSTIC_TAIL:]
    return qemu_says, started_at or time.monotonic(), False


def _panic_line(kernel_output: bytes) -> str:
    """The kernel's reason for its panic (``Kernel panic - not syncing: …``), else ""."""
    text = kernel_output.decode(errors="replace")
    start = text.find("Kernel panic - ")  # the first; the dump's last line repeats it
    return text[start:].splitlines()[0].removesuffix(" ]---").strip() if start != -1 else ""


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
