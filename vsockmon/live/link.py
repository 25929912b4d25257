"""The vsockmon0 tap link: create, raise, delete and inspect it through rtnetlink.

A capture needs the link only while it runs, so :func:`managed_link` creates it on entry and
deletes it on the way out — normal return, exception, SIGINT, SIGTERM or SIGHUP — but only if
it created it: a link that was there before is left as it was. A process killed with SIGKILL
cannot clean up, so the creator leaves a marker (``/run/vsockmon/NAME.pid``) and
:func:`link_status` can tell a link left behind by a dead run from one in use.

Also here: the few kernel facts needed to explain a failure in one line (capabilities, kernel
config, module support), which :mod:`vsockmon.live.doctor` reuses.
"""

from __future__ import annotations

import errno
import gzip
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from vsockmon.errors import VsockmonError
from vsockmon.wire.protocol import ARPHRD_VSOCKMON

DEFAULT_LINK = "vsockmon0"
MODULE = "vsockmon"
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
RUN_DIR_ENV = "VSOCKMON_RUN_DIR"
"""Overrides ``/run/vsockmon`` (where creation markers live); tests point it elsewhere."""
IFF_UP = 1


class LinkError(VsockmonError):
    """A link operation that failed; the message is one line for the user."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM or SIGHUP while a managed link is held, so that
    ``finally`` blocks (the link's removal among them) run as they do on SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- kernel facts ---------------------------------------------------------------------------


def capabilities(status_path: str = "/proc/self/status") -> int | None:
    """This process's effective capability bits (``CapEff``), or None when unreadable."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def has_capability(cap: int, caps: int | None = None) -> bool:
    caps = capabilities() if caps is None else caps
    return caps is not None and bool(caps >> cap & 1)


def kernel_release() -> str:
    return platform.release()


def kernel_config(release: str | None = None) -> tuple[dict[str, str], str | None]:
    """The kernel's build options (``CONFIG_X`` → ``y``/``m``/value; unset ones absent) and
    the file they came from, or ``({}, None)`` when neither /boot nor /proc has them."""
    release = release or kernel_release()
    for path in (f"/boot/config-{release}", "/proc/config.gz"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        return parse_config(text), path
    return {}, None


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a kernel .config; ``# CONFIG_X is not set`` → absent."""
    config = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value.strip('"')
    return config


def modules_supported() -> bool:
    """Whether this kernel loads modules at all (``/proc/modules`` exists)."""
    return os.path.exists("/proc/modules")


def module_loaded(name: str) -> bool:
    """Loaded as a module, or built in with parameters visible (``/sys/module/NAME``)."""
    return os.path.isdir(f"/sys/module/{name}")


def module_available(name: str, release: str | None = None) -> bool | None:
    """Whether ``modprobe NAME`` can find the module (built in or a .ko listed in
    modules.dep); None when the module tree is missing (often: inside a container)."""
    base = f"/lib/modules/{release or kernel_release()}"
    found_any = False
    for index in ("modules.builtin", "modules.dep"):
        try:
            with open(f"{base}/{index}") as f:
                found_any = True
                for line in f:
                    path = line.split(":", 1)[0]
                    stem = os.path.basename(path).split(".ko", 1)[0]
                    if stem.replace("-", "_") == name:
                        return True
        except OSError:
            continue
    return False if found_any else None


# -- links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkState:
    """What the kernel says about one link."""

    name: str
    index: int
    ifi_type: int
    kind: str | None
    up: bool
    mtu: int

    @property
    def is_vsockmon(self) -> bool:
        return self.ifi_type == ARPHRD_VSOCKMON


# -- rtnetlink ------------------------------------------------------------------------------
# Four requests (get, add, set up/down, delete) over a NETLINK_ROUTE socket. pyroute2 would do
# it too, but importing it costs 2-8 s in the lab VM on every capture start.

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 18, 1
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel's errno for a request (``.errno``)."""


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTA.pack(_RTA.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(buf: bytes, pos: int, end: int) -> dict[int, bytes]:
    out = {}
    while pos + _RTA.size <= end:
        length, kind = _RTA.unpack_from(buf, pos)
        if length < _RTA.size:
            break
        out[kind & 0x3FFF] = buf[pos + _RTA.size:pos + length]  # without NLA_F_NESTED
        pos += (length + 3) & ~3
    return out


def _request(msg_type: int, flags: int, index: int = 0, ifflags: int = 0, change: int = 0,
             attrs: bytes = b"") -> bytes | None:
    """Send one request; the payload of the kernel's RTM_NEWLINK answer, None for an ACK."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, ifflags, change) + attrs
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | flags, 1, 0)
                  + body)
        while True:
            data = sock.recv(65536)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _f, _seq, _pid = _NLMSG.unpack_from(data, pos)
                payload = data[pos + _NLMSG.size:pos + length]
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return None
                if kind == RTM_NEWLINK:
                    return payload
                pos += max((length + 3) & ~3, _NLMSG.size)


def _parse_link(payload: bytes) -> LinkState:
    _family, ifi_type, index, flags, _change = _IFINFO.unpack_from(payload)
    attrs = _attrs(payload, _IFINFO.size, len(payload))
    info = _attrs(attrs.get(IFLA_LINKINFO, b""), 0, len(attrs.get(IFLA_LINKINFO, b"")))
    kind = info.get(IFLA_INFO_KIND)
    mtu = attrs.get(IFLA_MTU)
    return LinkState(attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(), index, ifi_type,
                     kind.rstrip(b"\0").decode() if kind else None, bool(flags & IFF_UP),
                     struct.unpack("=I", mtu)[0] if mtu else 0)


def _name_attr(name: str) -> bytes:
    return _attr(IFLA_IFNAME, name.encode() + b"\0")


def get_link(name: str = DEFAULT_LINK) -> LinkState | None:
    """The link called ``name``, or None."""
    try:
        payload = _request(RTM_GETLINK, 0, attrs=_name_attr(name))
    except NetlinkError as e:
        if e.errno == errno.ENODEV:
            return None
        raise LinkError(f"cannot look up {name}: {e.strerror}") from None
    return _parse_link(payload) if payload else None


def require_net_admin(action: str) -> None:
    """Fail early, in one line, when the process cannot manage links."""
    caps = capabilities()
    if caps is not None and not has_capability(CAP_NET_ADMIN, caps):
        raise LinkError(
            f"{action} needs CAP_NET_ADMIN, which this process lacks (CapEff {caps:#x}, "
            f"uid {os.getuid()}); run as root (sudo), or in a container add "
            "--cap-add NET_ADMIN --cap-add NET_RAW"
        )


def _explain_missing_kind(modprobe_error: str | None) -> str:
    """Why the kernel does not know the link kind ``vsockmon``, as one line."""
    release = kernel_release()
    config, source = kernel_config(release)
    setting = config.get("CONFIG_VSOCKMON")
    if source and setting is None:
        extra = "" if modules_supported() else " (and cannot load modules)"
        return (f"kernel {release} is built without CONFIG_VSOCKMON{extra} (per {source}); "
                "vsockmon capture needs a kernel with CONFIG_VSOCKMON=m or =y (Linux >= 4.12)")
    if not modules_supported():
        return (f"kernel {release} has no vsockmon link type and cannot load modules; "
                "use a kernel with CONFIG_VSOCKMON=y")
    if modprobe_error:
        hint = ""
        if module_available(MODULE, release) is None:
            hint = (f" (no /lib/modules/{release} here: in a container, load it on the host "
                    "with `modprobe vsockmon`)")
        return f"cannot load module vsockmon: {modprobe_error}{hint}"
    return f"kernel {release} does not know the link type vsockmon even with the module loaded"


def load_module(name: str = MODULE) -> str | None:
    """``modprobe NAME``; None on success, else modprobe's complaint in one line."""
    modprobe = shutil.which("modprobe") or next(
        (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.path.exists(p)), None)
    if modprobe is None:
        return "modprobe not found (install kmod)"
    try:
        done = subprocess.run([modprobe, name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"modprobe failed: {e}"
    if done.returncode == 0:
        return None
    lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"modprobe exited with status {done.returncode}"


def create_link(name: str = DEFAULT_LINK) -> LinkState:
    """Create the vsockmon link ``name`` and bring it up; loads the module when needed."""
    require_net_admin(f"creating {name}")
    err = _try_add(name)
    if err is not None and err.errno == errno.EOPNOTSUPP:
        # The kernel knows no "vsockmon" kind: its own module autoload did not help.
        problem = None
        if modules_supported() and not module_loaded(MODULE):
            problem = load_module()
            if problem is None:
                err = _try_add(name)
        if problem is not None or (err is not None and err.errno == errno.EOPNOTSUPP):
            raise LinkError(f"cannot create {name}: {_explain_missing_kind(problem)}")
    if err is not None:
        raise _link_error(f"cannot create {name}", err)
    state = get_link(name)
    if state is None:
        raise LinkError(f"{name} vanished right after it was created")
    try:
        _set_flags(state.index, up=True)
    except NetlinkError as e:
        with suppress(NetlinkError):
            _request(RTM_DELLINK, NLM_F_ACK, index=state.index)
        raise _link_error(f"cannot bring {name} up", e) from None
    return get_link(name) or state


def _try_add(name: str) -> NetlinkError | None:
    kind = _attr(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"vsockmon"))
    try:
        _request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                 attrs=_name_attr(name) + kind)
    except NetlinkError as e:
        return e
    return None


def _set_flags(index: int, up: bool) -> None:
    _request(RTM_NEWLINK, NLM_F_ACK, index=index, ifflags=IFF_UP if up else 0, change=IFF_UP)


def _link_error(what: str, e: NetlinkError) -> LinkError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return LinkError(f"{what}: permission denied; needs CAP_NET_ADMIN (run as root)")
    if e.errno == errno.EEXIST:
        return LinkError(f"{what}: a link with that name already exists")
    return LinkError(f"{what}: {e.strerror}")


def set_up(state: LinkState, up: bool) -> None:
    try:
        _set_flags(state.index, up)
    except NetlinkError as e:
        raise _link_error(f"cannot set {state.name} {'up' if up else 'down'}", e) from None


def delete_link(name: str = DEFAULT_LINK) -> bool:
    """Delete the vsockmon link ``name``; False when there was none. Refuses other kinds."""
    state = get_link(name)
    if state is None:
        clear_marker(name)
        return False
    if not state.is_vsockmon:
        raise LinkError(f"{name} is not a vsockmon link (type {state.ifi_type}); not deleting it")
    require_net_admin(f"deleting {name}")
    try:
        _request(RTM_DELLINK, NLM_F_ACK, index=state.index)
    except NetlinkError as e:
        if e.errno != errno.ENODEV:
            raise _link_error(f"cannot delete {name}", e) from None
    clear_marker(name)
    return True


# -- markers: who created a link --------------------------------------------------------------


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV, "/run/vsockmon")


def _marker_path(name: str) -> str:
    return os.path.join(run_dir(), f"{name}.pid")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the pid
    it names a process uniquely, so a reused pid is not taken for the creator."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def write_marker(name: str) -> None:
    """Best effort: a run that cannot write /run still works, only without the marker."""
    with suppress(OSError):
        os.makedirs(run_dir(), exist_ok=True)
        with open(_marker_path(name), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid()) or '-'}\n")


def clear_marker(name: str) -> None:
    with suppress(OSError):
        os.unlink(_marker_path(name))


@dataclass(frozen=True)
class Marker:
    pid: int
    running: bool


def read_marker(name: str) -> Marker | None:
    try:
        with open(_marker_path(name)) as f:
            pid_text, _, started = f.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    now = _start_time(pid)
    running = now is not None and started in ("-", now)
    return Marker(pid, running)


@dataclass(frozen=True)
class LinkStatus:
    name: str
    state: LinkState | None
    marker: Marker | None

    def describe(self) -> str:
        """One line for ``vsockmon link status``."""
        s, m = self.state, self.marker
        if s is None:
            stale = f" (stale marker of pid {m.pid} removed)" if m else ""
            return f"{self.name}: absent{stale}"
        if not s.is_vsockmon:
            return f"{self.name}: exists but is not a vsockmon link (type {s.ifi_type})"
        text = f"{self.name}: {'up' if s.up else 'down'}, index {s.index}, mtu {s.mtu}"
        if m is None:
            return text + ", not created by a running vsockmon (persistent)"
        if m.running:
            return text + f", created by pid {m.pid} (running)"
        return (text + f", left behind by pid {m.pid} (not running); "
                f"remove it with: vsockmon link down -i {self.name}")

    def as_dict(self) -> dict[str, object]:
        s, m = self.state, self.marker
        return {
            "name": self.name,
            "exists": s is not None,
            "vsockmon": bool(s and s.is_vsockmon),
            "up": bool(s and s.up),
            "index": s.index if s else None,
            "mtu": s.mtu if s else None,
            "creator_pid": m.pid if m else None,
            "creator_running": m.running if m else None,
            "left_behind": bool(s and m and not m.running),
        }


def link_status(name: str = DEFAULT_LINK) -> LinkStatus:
    state = get_link(name)
    marker = read_marker(name)
    if state is None and marker is not None and not marker.running:
        clear_marker(name)
    return LinkStatus(name, state, marker)


# -- the context manager ------------------------------------------------------------------------


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """In the main thread, turn SIGTERM and SIGHUP into :class:`Terminated` (when nobody else
    handles them), so the caller's ``finally`` runs; restores the old handlers after."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Keep a second Ctrl-C from interrupting the teardown itself."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass(frozen=True)
class HeldLink:
    """The link a :func:`managed_link` block uses, and what it will undo on the way out."""

    state: LinkState
    created: bool
    raised: bool
    """It was down and this block brought it up (it will be set down again)."""


@contextmanager
def managed_link(name: str = DEFAULT_LINK) -> Iterator[HeldLink]:
    """A vsockmon link that is up for the block's duration.

    A link created here is deleted on exit, whatever the exit (SIGTERM and SIGHUP included);
    a pre-existing one is left as it was (set down again if it was down). Signals are held
    back while the link is acquired and released, so none can slip between the creation
    and the ``try`` that guarantees the removal.
    """
    held: HeldLink | None = None
    with _terminate_raises():
        try:
            with _signals_blocked():
                held = _acquire(name)
            yield held
        finally:
            if held is not None:
                with _signals_blocked():
                    release(held)


def _acquire(name: str) -> HeldLink:
    state = get_link(name)
    if state is not None and not state.is_vsockmon:
        raise LinkError(f"{name} exists but is not a vsockmon link "
                        f"(type {state.ifi_type}); choose another name with -i")
    if state is None:
        held = HeldLink(create_link(name), created=True, raised=False)
        write_marker(name)
        return held
    if not state.up:
        require_net_admin(f"bringing {name} up")
        set_up(state, True)
        return HeldLink(state, created=False, raised=True)
    return HeldLink(state, created=False, raised=False)


def release(held: HeldLink) -> None:
    """Undo what acquiring ``held`` did (used by :func:`managed_link` and by a forked
    privileged parent that outlives its capturing child)."""
    if held.created:
        delete_link(held.state.name)
    elif held.raised:
        with suppress(LinkError):
            set_up(held.state, False)
