"""Checks of what a vsock capture needs on this machine, each with the command that fixes it.

Reads /proc, /sys, /boot and /dev (``stat`` only: /dev/vsock belongs to the machine's
infrastructure and is opened only with ``probe=True``, for the local CID). Runs
``qemu-system-* --version`` and read-only ``virsh`` when present, and asks the kernel for open
vsock sockets over NETLINK_SOCK_DIAG. Parsers are separate functions that take text, so they
are tested without the machine they describe.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from vsockmon.live import kernel_facts, link
from vsockmon.live.echo import TYPES
from vsockmon.wire.protocol import CID_NAMES

OK, FAIL, INFO = "ok", "fail", "info"
SYMBOLS = {OK: "✓", FAIL: "✗", INFO: "-"}
VSOCK_MODULES = ("vsock", "vsock_loopback", "vmw_vsock_virtio_transport",
                 "vmw_vsock_virtio_transport_common", "vhost_vsock", "vsock_diag", "vsockmon")
MIN_KERNEL = (4, 12)
"""vsockmon (and CONFIG_VSOCKMON) appeared in Linux 4.12."""
MIN_QEMU = (2, 8)
"""vhost-vsock-pci appeared in QEMU 2.8."""


@dataclass(frozen=True)
class DoctorCheck:
    """One line of the report. ``prereq`` checks decide the exit status."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    prereq: bool = False

    def line(self) -> str:
        text = f"{SYMBOLS[self.status]} {self.name}: {self.detail}"
        if self.fix and self.status != OK:
            text += f"  → fix: {self.fix}"
        return text


# -- parsers (pure) ----------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of the first ``N.M`` in ``text``."""
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_modules(text: str) -> dict[str, int]:
    """/proc/modules → module name → reference count."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[parts[0]] = int(parts[2]) if parts[2].isdigit() else 0
    return out


@dataclass(frozen=True)
class Guest:
    """A running VM with a vsock device, as its process's command line shows it."""

    pid: int
    vmm: str
    cid: int | None
    tapped: bool
    """Whether its vsock traffic passes the host kernel's vhost-vsock (and so vsockmon)."""

    def describe(self) -> str:
        cid = f"CID {self.cid}" if self.cid is not None else "CID set over its API"
        where = ("vhost-vsock: on this host's vsockmon" if self.tapped else
                 "vsock device in user space: this host's vsockmon sees nothing; "
                 "capture inside the guest")
        return f"{self.vmm} pid {self.pid}: {cid} ({where})"


_GUEST_CID = re.compile(r"(?:^|,)guest-cid=(\d+)(?:,|$)")
_CH_CID = re.compile(r"(?:^|,)cid=(\d+)(?:,|$)")


def parse_guest(pid: int, argv: list[str]) -> Guest | None:
    """The vsock guest a VMM's command line describes, or None for any other process.

    QEMU names the CID of a kernel vhost-vsock device (``-device
    vhost-vsock-pci,guest-cid=3``, what libvirt and Kata's QEMU pass); vhost-user-vsock,
    Cloud Hypervisor (``--vsock cid=3,socket=…``) and Firecracker (configured over its API)
    run the device in user space, where the host's tap never sees the traffic.
    """
    prog = os.path.basename(argv[0]) if argv else ""
    if prog.startswith("qemu-system") or prog in ("qemu-kvm", "kvm"):
        for arg in argv[1:]:
            if "vhost-user-vsock" in arg:
                m = _GUEST_CID.search(arg)
                return Guest(pid, "qemu (vhost-user-vsock)", int(m[1]) if m else None, False)
            if "vhost-vsock" in arg and (m := _GUEST_CID.search(arg)):
                return Guest(pid, "qemu", int(m[1]), True)
        return None
    if prog == "cloud-hypervisor":
        spec = next((b for a, b in itertools.pairwise(argv) if a == "--vsock"), None)
        if spec is None:
            return None
        m = _CH_CID.search(spec)
        return Guest(pid, "cloud-hypervisor", int(m[1]) if m else None, False)
    if prog == "firecracker":
        return Guest(pid, "firecracker", None, False)
    return None


def parse_vsock_cids(xml_text: str) -> list[int]:
    """CIDs of the ``<vsock><cid address=…/>`` devices in a libvirt domain XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return []
    cids = []
    for cid in root.iterfind("./devices/vsock/cid"):
        address = cid.get("address")
        if address and address.isdigit():
            cids.append(int(address))
    return cids


VSOCK_DIAG_MSG = struct.Struct("=BBBBIIIII8s")
"""struct vsock_diag_msg: family, type, state, shutdown, src cid/port, dst cid/port, inode."""
SOCK_TYPES = {number: name for name, number in TYPES.items()}
TCP_STATES = {1: "established", 2: "connecting", 7: "closed", 10: "listening", 11: "closing"}


@dataclass(frozen=True)
class VsockSocket:
    type: str
    state: str
    local: tuple[int, int]
    remote: tuple[int, int]
    inode: int


def parse_diag_messages(data: bytes) -> tuple[list[VsockSocket], int | None, bool]:
    """Sockets in a NETLINK_SOCK_DIAG reply, the errno of an NLMSG_ERROR (or None), and
    whether NLMSG_DONE was seen."""
    sockets: list[VsockSocket] = []
    pos = 0
    while pos + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, pos)
        if length < 16:
            break
        if kind == 3:  # NLMSG_DONE
            return sockets, None, True
        if kind == 2:  # NLMSG_ERROR: a negative errno
            code = -struct.unpack_from("=i", data, pos + 16)[0]
            return sockets, code or None, code == 0
        if length >= 16 + VSOCK_DIAG_MSG.size:
            (_fam, stype, state, _shut, scid, sport, dcid, dport, ino,
             _cookie) = VSOCK_DIAG_MSG.unpack_from(data, pos + 16)
            sockets.append(VsockSocket(SOCK_TYPES.get(stype, str(stype)),
                                       TCP_STATES.get(state, str(state)),
                                       (scid, sport), (dcid, dport), ino))
        pos += (length + 3) & ~3
    return sockets, None, False


def vsock_sockets() -> list[VsockSocket]:
    """Open vsock sockets, as the kernel's vsock_diag reports them (raises OSError)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
    try:
        sock.settimeout(5)
        req = struct.pack("=BBHIII8s", socket.AF_VSOCK, 0, 0, 0xFFFFFFFF, 0, 0, b"")
        hdr = struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0)  # BY_FAMILY, REQUEST|DUMP
        sock.sendto(hdr + req, (0, 0))
        found: list[VsockSocket] = []
        while True:
            more, code, done = parse_diag_messages(sock.recv(65536))
            found += more
            if code:
                raise OSError(code, os.strerror(code))
            if done:
                return found
    finally:
        sock.close()


# -- checks ------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def check_kernel() -> DoctorCheck:
    release = link.kernel_release()
    version = parse_version(release)
    if version is not None and version < MIN_KERNEL:
        return DoctorCheck("kernel", FAIL, f"{release}: vsockmon needs Linux >= 4.12",
                           "boot a newer kernel", prereq=True)
    return DoctorCheck("kernel", OK, release)


def check_kernel_defects() -> Iterator[DoctorCheck]:
    """The running kernel's known tap and transport defects (vsockmon.live.kernel_facts):
    information for reading its captures, never a reason to refuse one."""
    version = kernel_facts.upstream_version(_read("/proc/version") or "", link.kernel_release())
    for defect, has, why in kernel_facts.verdicts(version):
        name = f"kernel: {defect.title}"
        if has is False:
            yield DoctorCheck(name, OK, f"not seen ({why})")
        elif has:
            yield DoctorCheck(name, INFO, f"PRESENT: {defect.shows} ({why})", defect.advice)
        else:
            yield DoctorCheck(name, INFO, why, defect.advice)


_CONFIG_ROLES = {
    "CONFIG_VSOCKMON": "vsockmon tap device (capture)",
    "CONFIG_VHOST_VSOCK": "host side of QEMU/KVM guests (vhost-vsock)",
    "CONFIG_VIRTIO_VSOCKETS": "guest side (virtio-vsock driver)",
    "CONFIG_VSOCKETS_LOOPBACK": "local loopback, CID 1",
}


def check_configs(modules: dict[str, int] | None) -> Iterator[DoctorCheck]:
    config, source = link.kernel_config()
    module_of = {"CONFIG_VSOCKMON": "vsockmon", "CONFIG_VHOST_VSOCK": "vhost_vsock",
                 "CONFIG_VIRTIO_VSOCKETS": "vmw_vsock_virtio_transport",
                 "CONFIG_VSOCKETS_LOOPBACK": "vsock_loopback"}
    for option, role in _CONFIG_ROLES.items():
        prereq = option == "CONFIG_VSOCKMON"
        value = config.get(option)
        mod = module_of[option]
        loaded = modules is not None and mod in modules
        if value in ("y", "m"):
            how = "built in" if value == "y" else ("module, loaded" if loaded
                                                   else "module, not loaded")
            yield DoctorCheck(option, OK, f"{value} ({how}): {role}")
        elif source is not None:
            build = "m" if modules is not None else "y"
            yield DoctorCheck(option, FAIL if prereq else INFO,
                              f"not set in {source}: no {role}",
                              f"use a kernel built with {option}={build}", prereq)
        elif loaded or link.module_available(mod):
            yield DoctorCheck(option, OK, f"module {mod} {'loaded' if loaded else 'available'} "
                                          f"(kernel config not readable): {role}")
        else:
            yield DoctorCheck(option, FAIL if prereq else INFO,
                              f"unknown (no /boot/config-{link.kernel_release()} or "
                              f"/proc/config.gz) and module {mod} not found: {role}",
                              f"modprobe {mod}", prereq)


def check_modules(modules: dict[str, int] | None) -> DoctorCheck:
    if modules is None:
        return DoctorCheck("modules", INFO, "this kernel has no loadable modules (all built in)")
    present = [m for m in VSOCK_MODULES if m in modules]
    return DoctorCheck("modules", INFO, "loaded: " + (", ".join(present) if present else
                                                 "no vsock modules"))


def check_devices() -> Iterator[DoctorCheck]:
    for path, present, absent, fix in (
        ("/dev/vsock", "present: vsock sockets work here",
         "absent: no vsock transport loaded", "modprobe vsock_loopback (or a virtio/vhost one)"),
        ("/dev/vhost-vsock", "present: QEMU guests here can get a vsock device",
         "absent: this machine cannot give QEMU guests vsock", "modprobe vhost_vsock"),
    ):
        exists = os.path.exists(path)  # stat only: never open these here
        yield DoctorCheck(path, OK if exists else INFO, present if exists else absent, fix)


def check_local_cid(probe: bool) -> DoctorCheck:
    if not probe:
        return DoctorCheck("local CID", INFO, "not probed (--probe opens /dev/vsock to ask)")
    import fcntl

    try:
        fd = os.open("/dev/vsock", os.O_RDONLY)
    except OSError as e:
        return DoctorCheck("local CID", INFO, f"cannot open /dev/vsock: {e.strerror}")
    try:
        raw = fcntl.ioctl(fd, socket.IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytes(4))
    except OSError as e:
        return DoctorCheck("local CID", INFO, f"ioctl failed: {e.strerror}")
    finally:
        os.close(fd)
    cid = struct.unpack("=I", raw)[0]
    return DoctorCheck("local CID", OK, f"{cid} ({CID_NAMES.get(cid, 'guest')})")


def check_capabilities() -> Iterator[DoctorCheck]:
    caps = link.capabilities()
    for cap, name, why in ((link.CAP_NET_ADMIN, "CAP_NET_ADMIN", "create the vsockmon link"),
                           (link.CAP_NET_RAW, "CAP_NET_RAW", "read it (packet socket)")):
        have = link.has_capability(cap, caps)
        yield DoctorCheck(name, OK if have else FAIL,
                          f"{'present' if have else 'missing'}: needed to {why}",
                          "run as root (sudo vsockmon …), or add the capability to the container",
                          prereq=True)


def check_packet_sockets() -> DoctorCheck:
    if os.path.exists("/proc/net/packet"):
        return DoctorCheck("AF_PACKET", OK, "packet sockets available")
    return DoctorCheck("AF_PACKET", FAIL, "no packet sockets (CONFIG_PACKET)", "modprobe af_packet",
                       prereq=True)


def check_link(name: str = link.DEFAULT_LINK) -> DoctorCheck:
    kind = _read(f"/sys/class/net/{name}/type")
    marker = link.read_marker(name)
    if kind is None:
        return DoctorCheck(name, INFO, "absent (vsockmon capture creates it)")
    if int(kind) != 826:
        return DoctorCheck(name, FAIL, f"exists but is not a vsockmon link (type {kind.strip()})",
                           "capture with another name: vsockmon capture -i vsockmon1", prereq=True)
    if marker is not None and not marker.running:
        return DoctorCheck(name, FAIL, f"left behind by pid {marker.pid} (not running)",
                           f"vsockmon link down -i {name}")
    return DoctorCheck(name, OK, "present")


def check_qemu() -> DoctorCheck:
    binaries = [b for b in ("qemu-system-x86_64", "qemu-system-aarch64", "qemu-kvm")
                if shutil.which(b)]
    if not binaries:
        return DoctorCheck("qemu", INFO, "not installed (only needed to run guests here)")
    out = _run([binaries[0], "--version"]) or ""
    version = parse_version(out.partition("version")[2] or out)
    if version is None:
        return DoctorCheck("qemu", INFO, f"{binaries[0]}: version unknown")
    text = f"{binaries[0]} {version[0]}.{version[1]}"
    if version < MIN_QEMU:
        return DoctorCheck("qemu", FAIL, f"{text}: vhost-vsock-pci needs >= 2.8", "upgrade qemu")
    return DoctorCheck("qemu", OK, f"{text} (vhost-vsock-pci: -device vhost-vsock-pci,guest-cid=N)")


def running_guests() -> list[Guest]:
    """Guests with a vsock device among this host's processes (reads /proc/*/cmdline)."""
    found = []
    for entry in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not entry.isdigit():
            continue
        raw = _read_bytes(f"/proc/{entry}/cmdline")
        guest = parse_guest(int(entry), [a.decode(errors="replace")
                                         for a in raw.split(b"\0") if a]) if raw else None
        if guest is not None:
            found.append(guest)
    return found


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def check_guests() -> DoctorCheck:
    guests = running_guests()
    if not guests:
        return DoctorCheck("guests", INFO, "no running VM with a vsock device (qemu, "
                           "cloud-hypervisor, firecracker)")
    return DoctorCheck("guests", INFO, "; ".join(g.describe() for g in guests))


def check_libvirt() -> DoctorCheck:
    if not shutil.which("virsh"):
        return DoctorCheck("libvirt", INFO, "virsh not installed")
    names = _run(["virsh", "-r", "list", "--all", "--name"])
    if names is None:
        return DoctorCheck("libvirt", INFO, "virsh cannot list domains (libvirtd not running?)")
    found = []
    for name in filter(None, (n.strip() for n in names.splitlines())):
        cids = parse_vsock_cids(_run(["virsh", "-r", "dumpxml", name]) or "")
        found += [f"{name}={cid}" for cid in cids]
    return DoctorCheck("libvirt", INFO, "guests with <vsock>: " + (", ".join(found) or "none"))


def check_sockets() -> DoctorCheck:
    try:
        found = vsock_sockets()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
            return DoctorCheck("vsock sockets", INFO,
                               "vsock_diag not available (CONFIG_VSOCKETS_DIAG)",
                               "modprobe vsock_diag")
        return DoctorCheck("vsock sockets", INFO, f"sock_diag failed: {e.strerror or e}")
    listening = sorted({f"{s.type}:{s.local[1]}" for s in found if s.state == "listening"})
    connected = sum(s.state == "established" for s in found)
    text = f"{len(found)} open, {connected} connected"
    if listening:
        text += ", listening: " + " ".join(listening)
    return DoctorCheck("vsock sockets", OK, text)


def run_checks(probe: bool = False) -> list[DoctorCheck]:
    """All checks, in report order."""
    modules_text = _read("/proc/modules")
    modules = parse_modules(modules_text) if modules_text is not None else None
    steps: list[Callable[[], DoctorCheck | Iterator[DoctorCheck]]] = [
        check_kernel,
        check_kernel_defects,
        lambda: check_configs(modules),
        lambda: check_modules(modules),
        check_capabilities,
        check_packet_sockets,
        check_link,
        check_devices,
        lambda: check_local_cid(probe),
        check_sockets,
        check_qemu,
        check_guests,
        check_libvirt,
    ]
    out: list[DoctorCheck] = []
    for step in steps:
        result = step()
        out += [result] if isinstance(result, DoctorCheck) else list(result)
    return out


def capture_ready(checks: list[DoctorCheck]) -> bool:
    return not any(c.prereq and c.status == FAIL for c in checks)


def as_dict(checks: list[DoctorCheck]) -> dict[str, object]:
    return {"capture_ready": capture_ready(checks), "checks": [asdict(c) for c in checks]}
