"""Classic BPF programs that select vsockmon frames inside the kernel (``SO_ATTACH_FILTER``).

Filtering in the kernel means unwanted frames never cross into a slow (guest) Python loop and
never take ring space, so they cannot cause drops. The program also truncates accepted
frames to the snap length, which is how tcpdump implements ``-s`` on a mmap ring.

BPF loads are big-endian while every vsockmon field is little-endian: rather than swapping at
run time, each comparison is split into the big-endian words, half-words and bytes that the
field's little-endian bytes form, so the program compares raw bytes exactly. Offsets and sizes
come from the field tables in :mod:`vsockmon.wire.protocol`. No I/O here except :func:`attach`.
"""

from __future__ import annotations

import array
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vsockmon.errors import VsockmonError
from vsockmon.wire.protocol import (
    MON_HDR_LEN,
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Field,
    Op,
    SockType,
    parse_cid,
)

# Opcodes (linux/filter.h): class | size | mode.
LD_W_ABS = 0x20
LD_H_ABS = 0x28
LD_B_ABS = 0x30
JEQ_K = 0x15
RET_K = 0x06
_LOADS = {4: LD_W_ABS, 2: LD_H_ABS, 1: LD_B_ABS}

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
MAX_JUMP = 255
"""Classic BPF conditional jumps are 8-bit forward offsets."""
DEFAULT_SNAPLEN = 262144
"""What tcpdump uses: larger than any vsockmon frame (65536 + 32 + 44)."""

_INSN = struct.Struct("=HBBI")


REJECT_ALL = _INSN.pack(RET_K, 0, 0, 0)
"""A program that takes no frame: how a stopping capture closes the tap (the kernel then
counts nothing more, so what it delivered before the stop is a fixed number)."""


class BpfFilterError(VsockmonError, ValueError):
    """A filter that cannot be expressed or compiled: one line for the user."""


@dataclass(frozen=True)
class BpfCheck:
    """``frame[offset:offset+size]`` holds ``value`` as a little-endian integer."""

    offset: int
    size: int
    value: int

    def loads(self) -> list[tuple[int, int, int]]:
        """(offset, width, big-endian constant) pieces that together test this field."""
        raw = self.value.to_bytes(self.size, "little")
        pieces, pos = [], 0
        while pos < self.size:
            width = next(w for w in (4, 2, 1) if pos + w <= self.size)
            pieces.append((self.offset + pos, width, int.from_bytes(raw[pos:pos + width], "big")))
            pos += width
        return pieces


Alternative = tuple[BpfCheck, ...]
"""Checks that must all hold."""


def _mon(name: str) -> Field:
    return next(f for f in VSOCKMON_HEADER.fields if f.name == name)


def _virtio(name: str) -> Field:
    f = next(f for f in VIRTIO_HEADER.fields if f.name == name)
    return Field(f.name, MON_HDR_LEN + f.offset, f.size, f.json_key, f.wireshark, f.enum)


def _check(f: Field, value: int) -> BpfCheck:
    if not 0 <= value < 1 << (8 * f.size):
        raise BpfFilterError(f"{f.name} {value} does not fit in {f.size} bytes")
    return BpfCheck(f.offset, f.size, value)


@dataclass(frozen=True)
class FrameFilter:
    """Which frames to keep: every non-empty criterion must hold (AND); within one, any of
    the listed values (OR). CIDs and ports match either end of the packet."""

    cids: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    types: tuple[SockType, ...] = ()
    ops: tuple[Op, ...] = ()
    snaplen: int = DEFAULT_SNAPLEN
    groups: list[list[Alternative]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.snaplen <= 0:
            raise BpfFilterError(f"snap length must be positive, not {self.snaplen}")
        groups: list[list[Alternative]] = []
        if self.cids:
            groups.append([(_check(_mon(end), c),) for c in self.cids
                           for end in ("src_cid", "dst_cid")])
        if self.ports:
            groups.append([(_check(_mon(end), p),) for p in self.ports
                           for end in ("src_port", "dst_port")])
        if self.types:
            groups.append([(_check(_virtio("type"), t),) for t in self.types])
        if self.ops:
            groups.append([(_check(_virtio("op"), o),) for o in self.ops])
        object.__setattr__(self, "groups", groups)

    def describe(self) -> str:
        """The filter in words, for the status line (``all frames`` when empty)."""
        parts = []
        for label, values in (("cid", self.cids), ("port", self.ports)):
            if values:
                parts.append(" or ".join(f"{label} {v}" for v in values))
        if self.types:
            parts.append(" or ".join(f"type {t.name}" for t in self.types))
        if self.ops:
            parts.append(" or ".join(f"op {o.name}" for o in self.ops))
        return " and ".join(f"({p})" if " or " in p and len(parts) > 1 else p
                            for p in parts) or "all frames"

    def program(self) -> list[tuple[int, int, int, int]]:
        """The classic BPF instructions (code, jt, jf, k)."""
        return compile_groups(self.groups, self.snaplen)

    def bytecode(self) -> bytes:
        """The program as the kernel's ``struct sock_filter`` array."""
        return b"".join(_INSN.pack(*insn) for insn in self.program())


def compile_groups(groups: Sequence[Sequence[Alternative]], accept: int) -> list[
        tuple[int, int, int, int]]:
    """A program that returns ``accept`` when every group has a matching alternative, else 0.

    Layout: each group is a run of alternatives; a failed piece jumps to the group's next
    alternative (or to the reject), a fully matched alternative jumps to the next group.
    """
    insns: list[tuple[int, object, object, int]] = []  # jumps still as labels
    labels: dict[object, int] = {}
    for gi, group in enumerate(groups):
        labels[("group", gi)] = len(insns)
        for ai, alt in enumerate(group):
            labels[(gi, ai)] = len(insns)
            fail: object = (gi, ai + 1) if ai + 1 < len(group) else "reject"
            pieces = [p for check in alt for p in check.loads()]
            for pi, (offset, width, k) in enumerate(pieces):
                insns.append((_LOADS[width], 0, 0, offset))
                ok: object = "next" if pi + 1 < len(pieces) else ("group", gi + 1)
                insns.append((JEQ_K, ok, fail, k))
    labels[("group", len(groups))] = len(insns)
    insns.append((RET_K, 0, 0, accept))
    if groups:  # nothing jumps to a reject without a condition
        labels["reject"] = len(insns)
        insns.append((RET_K, 0, 0, 0))
    return [(code, _jump(labels, i, jt), _jump(labels, i, jf), k)
            for i, (code, jt, jf, k) in enumerate(insns)]


def _jump(labels: dict[object, int], at: int, target: object) -> int:
    if target in (0, "next"):
        return 0
    offset = labels[target] - (at + 1)
    if not 0 <= offset <= MAX_JUMP:
        raise BpfFilterError("filter too long for classic BPF jumps; use fewer values")
    return offset


def attach(sock: socket.socket, code: bytes) -> None:
    """Attach ``code`` (from :meth:`FrameFilter.bytecode`) to ``sock`` in the kernel.

    ``struct sock_fprog`` holds a pointer to the instructions; an ``array`` gives a stable
    address without importing ctypes (expensive in the lab VM).
    """
    insns = array.array("B", code)
    address, _ = insns.buffer_info()
    fprog = struct.pack("@HP", len(code) // _INSN.size, address)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as e:
        raise BpfFilterError(f"kernel refused the capture filter: {e.strerror}") from None


def parse_values(values: Iterable[str]) -> list[str]:
    """Split repeated and comma-separated option values (``--op rw,rst --op shutdown``)."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_enum(values: Iterable[str], enum: type[Op] | type[SockType]) -> tuple:
    """Enum members from names (any case, ``credit-update`` or ``CREDIT_UPDATE``) or numbers."""
    out = []
    for v in parse_values(values):
        key = v.upper().replace("-", "_")
        if key in enum.__members__:
            out.append(enum[key])
        elif v.isdigit() and int(v) in enum._value2member_map_:
            out.append(enum(int(v)))
        else:
            names = ", ".join(m.name.lower() for m in enum)
            raise BpfFilterError(f"unknown {enum.__name__.lower()} {v!r} (one of: {names})")
    return tuple(out)


def parse_cids(values: Iterable[str]) -> tuple[int, ...]:
    """CIDs from repeated or comma-separated option values: numbers or the reserved CIDs'
    names (``host``, ``local``…), as decode's filters and output write them."""
    out = []
    for v in parse_values(values):
        try:
            out.append(parse_cid(v))
        except ValueError as e:
            raise BpfFilterError(f"bad cid: {e}") from None
    return tuple(out)


def parse_ints(values: Iterable[str], what: str) -> tuple[int, ...]:
    """Integers (decimal or 0x hex) from repeated or comma-separated option values."""
    out = []
    for v in parse_values(values):
        try:
            out.append(int(v, 0))
        except ValueError:
            raise BpfFilterError(f"bad {what} {v!r}: not a number") from None
    return tuple(out)
