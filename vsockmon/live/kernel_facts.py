"""What a kernel's vsock tap and transport are known to get wrong, and what a capture shows.

One table, two kinds of knowledge: what the lab measured on the Debian kernels it boots
(:data:`MEASURED`, held against the real kernels by tests/test_kernel_facts_lab.py and the
nested test in tests/test_lab.py), and what the kernel's history says of other versions
(:data:`DEFECTS`, from public trackers and commit subjects; docs/lab.md names them). ``doctor``
reads both for the running kernel. No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Defect:
    """One known misbehaviour of the tap or the transport."""

    id: str
    title: str
    shows: str
    """What a capture (or the application) shows when the kernel has it."""
    history: str
    """Which kernels have it, as the kernel's history tells."""
    advice: str


DEFECTS: tuple[Defect, ...] = (
    Defect("split-tap-length", "tap length of split packets",
           "host→guest fragments captured with the rest of the packet (captured payload > len)",
           "since the sk_buff rework; fixed in 2026 ('vsock/virtio: fix tap of split packets', "
           "backported)",
           "trust the virtio header's len: vsockmon does, and flags payload-len-mismatch"),
    Defect("nonlinear-tap", "payload of non-linear packets in the tap",
           "payload bytes empty or garbage while len is right (MSG_ZEROCOPY, large buffers)",
           "MSG_ZEROCOPY since 6.7, large buffers since mid-2025; fixed in 2026",
           "byte counts and credit stay right (they use len); payload dissection may not"),
    Defect("skb-overhead-reset", "reset after many tiny packets",
           "RST with credit left after a burst of small RW packets (sender: ENOBUFS)",
           "the CVE-2026-23086 mitigation, 6.12.92 and newer",
           "coalesce small writes; raise SO_VM_SOCKETS_BUFFER_SIZE"),
)
"""The defects, in the order doctor reports them."""


@dataclass(frozen=True)
class Measured:
    """What the lab measured on one kernel (by upstream version), per defect id."""

    release: str
    has: dict[str, bool]
    """Defect id → whether the lab saw it on this kernel."""
    zerocopy: bool
    """Whether ``send(MSG_ZEROCOPY)`` works on a vsock socket at all."""
    how: dict[str, str]


_NESTED = "a 10240-byte host→guest packet over the nested guest"
_TINY = "20,000 one-byte writes over loopback to a stalled reader"

MEASURED: dict[Version, Measured] = {
    (6, 1, 192): Measured(
        "6.1.0-57-amd64",
        {"split-tap-length": True, "nonlinear-tap": False, "skb-overhead-reset": False},
        zerocopy=False,
        how={"split-tap-length": _NESTED, "skb-overhead-reset": _TINY,
             "nonlinear-tap": "SO_ZEROCOPY is refused (Operation not supported)"}),
    **{(6, 12, patch): Measured(  # two point releases, each measured: the same facts
        f"6.12.{patch}+deb12-amd64",
        {"split-tap-length": False, "nonlinear-tap": False, "skb-overhead-reset": False},
        zerocopy=True,
        how={"split-tap-length": _NESTED, "skb-overhead-reset": _TINY,
             "nonlinear-tap": "64 KiB sent with MSG_ZEROCOPY over loopback, tapped byte-exact"})
       for patch in (117, 118)},
}
"""Debian kernels the lab boots, keyed by the upstream version ``/proc/version`` names."""


def upstream_version(proc_version: str, release: str) -> Version | None:
    """The kernel's upstream version: Debian names it last in /proc/version
    (``… (gcc-12 (Debian 12.2.0-14) …) #1 SMP … Debian 6.1.192-3 (…)``: the compiler's
    Debian version comes first), while ``uname -r`` carries only the ABI (``6.1.0-57``)."""
    named = re.findall(r"Debian (\d+)\.(\d+)\.(\d+)", proc_version)
    found = named[-1:] or re.findall(r"^(\d+)\.(\d+)\.(\d+)", release)
    if not found:
        return None
    major, minor, patch = (int(g) for g in found[0])
    return major, minor, patch


def verdicts(version: Version | None) -> list[tuple[Defect, bool | None, str]]:
    """Each defect with whether this kernel has it (None: not measured here) and why."""
    measured = MEASURED.get(version) if version else None
    out: list[tuple[Defect, bool | None, str]] = []
    for d in DEFECTS:
        if measured is None:
            out.append((d, None, f"not measured on this kernel; history: {d.history}"))
        else:
            out.append((d, measured.has[d.id], f"measured in the lab: {measured.how[d.id]}"))
    return out
