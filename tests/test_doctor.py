"""``vsockmon doctor``: its verdicts for a kernel with and without vsockmon, its parsers on
synthetic inputs, and the promise never to open /dev/vsock without --probe.

Nothing here depends on the kernel of the machine running the tests: the kernel's build
options, loaded modules and capabilities are given to the checks. The real kernels' verdicts
are checked in the lab (tests/test_link_lab.py)."""

from __future__ import annotations

import builtins
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vsockmon.live import doctor, link

VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, "doctor", *args], capture_output=True, text=True,
                          timeout=120)


ALL_CHECKS = ("kernel", "kernel: tap length of split packets",
              "kernel: payload of non-linear packets in the tap",
              "kernel: reset after many tiny packets", "CONFIG_VSOCKMON", "CONFIG_VHOST_VSOCK",
              "CONFIG_VIRTIO_VSOCKETS",
              "CONFIG_VSOCKETS_LOOPBACK", "modules", "CAP_NET_ADMIN", "CAP_NET_RAW", "AF_PACKET",
              "/dev/vsock", "/dev/vhost-vsock", "local CID", "vsock sockets", "qemu", "guests",
              "libvirt")


def _kernel(monkeypatch: pytest.MonkeyPatch, config: str, modules: str) -> None:
    """Make the checks see a kernel built with ``config``, with ``modules`` loaded, as root."""
    monkeypatch.setattr(link, "kernel_release", lambda: "6.1.0-test-amd64")
    monkeypatch.setattr(link, "kernel_config",
                        lambda *a: (link.parse_config(config), "/boot/config-6.1.0-test-amd64"))
    monkeypatch.setattr(link, "capabilities", lambda *a: 0x3000)  # NET_ADMIN + NET_RAW
    given = {"/proc/modules": modules, "/proc/version": PROC_VERSION}
    real_read = doctor._read
    monkeypatch.setattr(doctor, "_read", lambda path: given.get(path) or real_read(path))


def _run_doctor(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from vsockmon.cli import main

    done = CliRunner().invoke(main, ["doctor", *args])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    return done.exit_code, done.output


PROC_VERSION = ("Linux version 6.1.0-test-amd64 (debian-kernel@lists.debian.org) (gcc-12 "
                "(Debian 12.2.0-14+deb12u1) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 "
                "(2026-10-20)\n")
WITHOUT = "CONFIG_VSOCKETS=m\nCONFIG_VSOCKETS_LOOPBACK=m\n# CONFIG_VSOCKMON is not set\n"
WITH = WITHOUT.replace("# CONFIG_VSOCKMON is not set", "CONFIG_VSOCKMON=m")
LOADED = ("vsockmon 16384 0 - Live 0x0\nvsock_loopback 16384 0 - Live 0x0\n"
          "vsock 57344 1 - Live 0x0\n")


def test_a_kernel_without_vsockmon_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel(monkeypatch, WITHOUT, "vsock 57344 0 - Live 0x0\n")
    code, out = _run_doctor()
    assert code == 1
    lines = out.splitlines()
    bad = next(ln for ln in lines if "CONFIG_VSOCKMON" in ln)
    # The option is unset in a config file that exists, on a kernel that loads modules: the
    # fix is a kernel with the option as a module.
    assert bad == ("✗ CONFIG_VSOCKMON: not set in /boot/config-6.1.0-test-amd64: no vsockmon "
                   "tap device (capture)  → fix: use a kernel built with CONFIG_VSOCKMON=m")
    assert lines[0] == "✓ kernel: 6.1.0-test-amd64"
    # Debian 6.1.192 is a kernel the lab measured: the split-packet tap defect is present.
    assert lines[1].startswith("- kernel: tap length of split packets: PRESENT: host→guest "
                               "fragments captured with the rest of the packet")
    assert lines[1].endswith("→ fix: trust the virtio header's len: vsockmon does, and flags "
                             "payload-len-mismatch")
    assert lines[2].startswith("✓ kernel: payload of non-linear packets in the tap: not seen "
                               "(measured in the lab: SO_ZEROCOPY is refused")
    assert "✓ CONFIG_VSOCKETS_LOOPBACK: m (module, not loaded): local loopback, CID 1" in lines
    assert any(ln.startswith("✓ CAP_NET_RAW: present") for ln in lines)
    assert any(ln.startswith("- local CID: not probed") for ln in lines)
    assert lines[-1] == "capture: NOT ready (see ✗ above)"
    assert all(ln[:2] in ("✓ ", "✗ ", "- ") for ln in lines[:-1])


def test_a_kernel_with_vsockmon_loaded_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel(monkeypatch, WITH, LOADED)
    code, out = _run_doctor()
    lines = out.splitlines()
    assert "✓ CONFIG_VSOCKMON: m (module, loaded): vsockmon tap device (capture)" in lines
    assert "- modules: loaded: vsock, vsock_loopback, vsockmon" in lines
    assert (code, lines[-1]) == (0, "capture: ready")


def test_json_report(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel(monkeypatch, WITHOUT, "")
    code, out = _run_doctor("--json")
    assert code == 1
    report = json.loads(out)
    assert report["capture_ready"] is False
    names = [c["name"] for c in report["checks"]]
    assert [n for n in names if not n.startswith("vsockmon")] == list(ALL_CHECKS)
    vsockmon = next(c for c in report["checks"] if c["name"] == "CONFIG_VSOCKMON")
    assert vsockmon["status"] == "fail" and vsockmon["prereq"] is True
    _kernel(monkeypatch, WITH, LOADED)
    code, out = _run_doctor("--json")
    assert (code, json.loads(out)["capture_ready"]) == (0, True)


def test_checks_never_open_dev_vsock(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *a, **kw)

    def spy_os_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        assert "vsock" not in str(path), "doctor opened a vsock device"
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    checks = doctor.run_checks(probe=False)
    assert checks and not [p for p in opened if p.startswith("/dev/")]


def test_parsers() -> None:
    assert doctor.parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg)") == (7, 2)
    assert doctor.parse_version("6.1.0-56-amd64") == (6, 1)
    mods = "vsockmon 16384 0 - Live 0x0\nvsock 53248 3 vsock_loopback,vsock_diag, Live 0x0\n"
    assert doctor.parse_modules(mods) == {"vsockmon": 0, "vsock": 3}
    xml = ("<domain><name>g</name><devices><vsock model='virtio'>"
           "<cid auto='no' address='42'/></vsock></devices></domain>")
    assert doctor.parse_vsock_cids(xml) == [42]
    assert doctor.parse_vsock_cids("<domain><devices/></domain>") == []
    assert doctor.parse_vsock_cids("not xml") == []


def _nlmsg(kind: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def test_sock_diag_replies_are_parsed() -> None:
    listen = doctor.VSOCK_DIAG_MSG.pack(socket.AF_VSOCK, socket.SOCK_STREAM, 10, 0,
                                        0xFFFFFFFF, 9999, 0, 0, 1234, b"")
    conn = doctor.VSOCK_DIAG_MSG.pack(socket.AF_VSOCK, socket.SOCK_SEQPACKET, 1, 0,
                                      1, 40000, 1, 9999, 1235, b"")
    data = _nlmsg(20, listen) + _nlmsg(20, conn) + _nlmsg(3, b"\0" * 4)
    found, code, done = doctor.parse_diag_messages(data)
    assert done and code is None
    assert found[0] == doctor.VsockSocket("stream", "listening", (0xFFFFFFFF, 9999), (0, 0),
                                          1234)
    assert (found[1].type, found[1].state, found[1].remote) == ("seqpacket", "established",
                                                                (1, 9999))
    err = _nlmsg(2, struct.pack("=i", -2) + b"\0" * 16)
    assert doctor.parse_diag_messages(err) == ([], 2, False)


def test_check_lines() -> None:
    check = doctor.DoctorCheck("CAP_NET_RAW", doctor.FAIL, "missing", "run as root", prereq=True)
    assert check.line() == "✗ CAP_NET_RAW: missing  → fix: run as root"
    assert doctor.DoctorCheck("x", doctor.OK, "fine", "unused").line() == "✓ x: fine"
    assert not doctor.capture_ready([check])
    assert doctor.capture_ready([doctor.DoctorCheck("x", doctor.FAIL, "not needed")])


@pytest.mark.parametrize(("argv", "expected"), [
    # libvirt's and Kata's QEMU: a kernel vhost-vsock device with its CID.
    (["/usr/bin/qemu-system-x86_64", "-name", "g", "-device",
      "vhost-vsock-pci,id=vsock0,guest-cid=42,vhostfd=30,bus=pci.0"], ("qemu", 42, True)),
    (["qemu-system-aarch64", "-device", "vhost-vsock-device,guest-cid=3"], ("qemu", 3, True)),
    # vhost-user-vsock: the device runs in a user-space daemon.
    (["qemu-system-x86_64", "-device", "vhost-user-vsock-pci,chardev=c0,guest-cid=5"],
     ("qemu (vhost-user-vsock)", 5, False)),
    (["/usr/bin/cloud-hypervisor", "--kernel", "k", "--vsock", "cid=7,socket=/run/v.sock"],
     ("cloud-hypervisor", 7, False)),
    (["firecracker", "--api-sock", "/run/fc.sock"], ("firecracker", None, False)),
    # Not a vsock guest: no device, another program, a CID only as a substring.
    (["qemu-system-x86_64", "-kernel", "vmlinuz", "-m", "1G"], None),
    (["qemu-system-x86_64", "-device", "virtio-net,my-guest-cid=3"], None),
    (["cloud-hypervisor", "--kernel", "k"], None),
    (["python3", "-c", "vhost-vsock-pci,guest-cid=3"], None),
    ([], None),
])
def test_guests_from_command_lines(argv: list[str], expected: tuple | None) -> None:
    guest = doctor.parse_guest(77, argv)
    assert (None if guest is None else (guest.vmm, guest.cid, guest.tapped)) == expected


def test_guest_lines_say_whether_the_tap_sees_them() -> None:
    assert doctor.Guest(9, "qemu", 3, True).describe() == \
        "qemu pid 9: CID 3 (vhost-vsock: on this host's vsockmon)"
    assert doctor.Guest(8, "firecracker", None, False).describe() == (
        "firecracker pid 8: CID set over its API (vsock device in user space: this host's "
        "vsockmon sees nothing; capture inside the guest)")
