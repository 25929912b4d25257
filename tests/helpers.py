"""Building blocks shared by the tests: synthetic frames and captures from the field tables."""

from __future__ import annotations

import struct
from pathlib import Path

from vsockmon.wire.pcapio import PcapWriter
from vsockmon.wire.protocol import MON_OP_OF, VIRTIO_HEADER, VSOCKMON_HEADER, Op, Transport

T0 = 1_700_000_000_000_000_000


def frame(op: Op = Op.RW, payload: bytes = b"", src: tuple[int, int] = (3, 1025),
          dst: tuple[int, int] = (2, 9999), type_: int = 1, flags: int = 0,
          buf_alloc: int = 262144, fwd_cnt: int = 0, length: int | None = None) -> bytes:
    """One tapped frame as the kernel writes it: vsockmon header, virtio header, payload."""
    addr = {"src_cid": src[0], "src_port": src[1], "dst_cid": dst[0], "dst_port": dst[1]}
    mon = VSOCKMON_HEADER.pack(**addr, op=MON_OP_OF.get(op, 0), transport=Transport.VIRTIO,
                               trans_len=VIRTIO_HEADER.size)
    virtio = VIRTIO_HEADER.pack(**addr, len=len(payload) if length is None else length,
                                type=type_, op=op, flags=flags, buf_alloc=buf_alloc,
                                fwd_cnt=fwd_cnt)
    return mon + virtio + payload


def write_pcap(path: Path, frames: list[bytes], step_ns: int = 1000) -> Path:
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        for i, f in enumerate(frames):
            w.write(T0 + i * step_ns, f)
    return path


def pcapng_comments(path: Path) -> list[str]:
    """The comment of every packet of a little-endian pcapng file, "" for none, read here
    block by block from the pcapng spec (EPB type 6, option 1 = opt_comment) rather than by
    our own reader: tshark shows the same (tests/test_export.py checks one file both ways),
    in-process, so a mutation run can afford it per test."""
    data, out, off = path.read_bytes(), [], 0
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        if btype == 6:
            caplen = struct.unpack_from("<I", data, off + 20)[0]
            opt, found = off + 28 + (caplen + 3) // 4 * 4, []
            while opt < off + blen - 4:
                code, olen = struct.unpack_from("<HH", data, opt)
                if code == 0:
                    break
                if code == 1:
                    found.append(data[opt + 4:opt + 4 + olen].decode())
                opt += 4 + (olen + 3) // 4 * 4
            out.append(",".join(found))
        off += blen
    return out


LAB_SHELL = r"""
set -u
wait_for() {  # FILE TEXT [COUNT]: until TEXT is on COUNT lines of FILE, at most WAIT_S s
  i=0
  until [ "$(cat "$1" 2> /dev/null | grep -c "$2")" -ge "${3:-1}" ]; do
    i=$((i + 1))
    [ "$i" -gt $((${WAIT_S:-60} * 10)) ] && { echo "timeout: $2 in $1" >&2; return 1; }
    sleep 0.1
  done
}
"""
"""The shell the lab tests' scripts start with: strict variables, and ``wait_for`` a
readiness line (a server's "listening", a capture's "capturing") before the next step."""
