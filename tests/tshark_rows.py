"""Wireshark's reading of a capture, frame by frame: the independent source that tests reason
from when a fixture has no generator truth (the lab captures).

Only tshark's own dissector is used (no plugin of ours), so nothing here shares code with
vsockmon's decoder or tracker.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("frame.number", "frame.time_epoch", "vsock.virtio.src_cid", "vsock.virtio.src_prot",
          "vsock.virtio.dst_cid", "vsock.virtio.dst_prot", "vsock.virtio.len",
          "vsock.virtio.type", "vsock.virtio.op", "vsock.virtio.flags",
          "vsock.virtio.buf_alloc", "vsock.virtio.fwd_cnt", "vsock.payload")

# virtio-vsock ops and flags, from include/uapi/linux/virtio_vsock.h
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
STREAM, SEQPACKET = 1, 2


@dataclass(frozen=True)
class Row:
    """One frame's virtio header as tshark decoded it (time in ns since the epoch)."""

    frame: int
    ts_ns: int
    src: tuple[int, int]
    dst: tuple[int, int]
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    captured: int
    """Payload bytes in the frame (the header's ``len`` is what the sender meant)."""


def _ns(epoch: str) -> int:
    """``1795580610.512983000`` → ns, exactly (no float)."""
    sec, _, frac = epoch.partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def _int(text: str) -> int:
    return int(text, 0)


def rows(path: Path) -> list[Row]:
    """Every frame with a virtio header, in capture order."""
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields",
                          *(a for f in FIELDS for a in ("-e", f))],
                         capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        cells = line.split("\t")
        if not cells[2]:
            continue
        (frame, ts, scid, sport, dcid, dport, length, typ, op, flags, buf, fwd,
         payload) = cells
        found.append(Row(int(frame), _ns(ts), (_int(scid), _int(sport)),
                         (_int(dcid), _int(dport)), _int(length), _int(typ), _int(op),
                         _int(flags), _int(buf), _int(fwd), len(payload.replace(":", "")) // 2))
    return found


def streams(found: list[Row]) -> list[list[Row]]:
    """The frames grouped into connections by the documented numbering rule: the key is
    (type, unordered pair of ends); a REQUEST starts a new stream for its key, any other frame
    joins the key's current stream (or starts one). Streams in order of their first frame."""
    current: dict[tuple[int, frozenset[tuple[int, int]]], int] = {}
    out: list[list[Row]] = []
    for r in found:
        key = (r.type, frozenset((r.src, r.dst)))
        if r.op == REQUEST or key not in current:
            current[key] = len(out)
            out.append([])
        out[current[key]].append(r)
    return out
