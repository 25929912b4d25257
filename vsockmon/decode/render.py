"""Text views of decoded frames: the one-line summary, the table row and the ``-V`` tree.

Pure functions from a :class:`~vsockmon.decode.frames.Frame` to strings; the CLI prints them.
Names come from the protocol enums, so SEQPACKET, CREDIT_REQUEST (op 7) and the flag bits
are shown by name where Wireshark and tcpdump show numbers or get them wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vsockmon.decode import _render
from vsockmon.decode.frames import Frame, FrameBatch, anomaly_names, dictionary_column
from vsockmon.decode.rows import Rows
from vsockmon.wire.protocol import (
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Field,
    MonOp,
    Op,
    SockType,
    cid_label,
    enum_name,
    flag_names,
)

PREVIEW_BYTES = 24
TABLE_HEADERS = ("no", "time", "source", "destination", "type", "op", "len", "flags",
                 "buf_alloc", "fwd_cnt", "payload")


def preview(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """Printable text in quotes, else hex; ``…`` when cut."""
    head = data[:limit]
    more = "…" if len(data) > limit else ""
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        text = head.decode("ascii").encode("unicode_escape").decode("ascii").replace('"', '\\"')
        return f'"{text}"{more}'
    return head.hex() + more


def _ends(frame: Frame) -> tuple[str, str]:
    src_cid, src_port, dst_cid, dst_port = frame.addr
    return f"{src_cid}:{src_port}", f"{dst_cid}:{dst_port}"


def row(frame: Frame, t0_ns: int) -> tuple[object, ...]:
    """The columns of a frame's summary, shared by the line and the table views."""
    src, dst = _ends(frame)
    rel = f"{(frame.ts_ns - t0_ns) / 1e9:.6f}"
    if not frame.has_virtio:
        mon = frame.mon if frame.has_mon else None
        op = enum_name(MonOp, mon["op"]) if mon else "-"
        return (frame.number, rel, src if mon else "?", dst if mon else "?", "-", op, "-", "-",
                "-", "-", preview(frame.payload))
    v = frame.virtio
    flags = ",".join(flag_names(v["op"], v["type"], v["flags"])) or "-"
    return (frame.number, rel, src, dst, enum_name(SockType, v["type"]),
            enum_name(Op, v["op"]), v["len"], flags, v["buf_alloc"], v["fwd_cnt"],
            preview(frame.payload[: v["len"]]) if v["len"] else "")


def summary_line(frame: Frame, t0_ns: int, payload_summary: str | None = None) -> str:
    """One tcpdump-like line: time, ends, type, op, len, flags, credit, a preview of the
    payload and, after ``|``, what a payload dissector made of it."""
    no, rel, src, dst, typ, op, length, flags, buf, fwd, pay = row(frame, t0_ns)
    parts = [f"{no:>6} {rel:>12}  {src} → {dst}  {typ} {op}"]
    if length != "-":
        parts.append(f"len={length}")
    if flags != "-":
        parts.append(f"[{flags}]")
    if buf != "-":
        parts.append(f"buf_alloc={buf} fwd_cnt={fwd}")
    if pay:
        parts.append(str(pay))
    if payload_summary:
        parts.append(f"| {payload_summary}")
    if frame.anomalies:
        parts.append("!" + ",".join(frame.anomalies))
    return " ".join(parts)


def tree(frame: Frame, payload_lines: list[str] | None = None) -> list[str]:
    """The ``-V`` field tree: every field of both headers with names, then the payload."""
    out = [f"Frame {frame.number}: {frame.caplen} bytes captured ({frame.orig_len} on the wire),"
           f" time {frame.ts_ns // 1_000_000_000}.{frame.ts_ns % 1_000_000_000:09d}"]
    if frame.has_mon:
        out.append("vsockmon header")
        out += _field_lines(VSOCKMON_HEADER.fields, frame.mon)
    if frame.has_virtio:
        out.append("virtio-vsock header")
        out += _field_lines(VIRTIO_HEADER.fields, frame.virtio)
    data = frame.payload
    out.append(f"payload: {len(data)} bytes captured")
    out += [f"    {line}" for line in hexdump(data)]
    if payload_lines:
        out += [f"    {line}" for line in payload_lines]
    if frame.anomalies:
        out.append("anomalies: " + ", ".join(frame.anomalies))
    return out


def _field_lines(fields: tuple[Field, ...], values: dict[str, int]) -> list[str]:
    """One line per field; value names come from the field table's enums."""
    lines = []
    for f in fields:
        value = values[f.name]
        enum = f.enum
        shown = str(value)
        if f.name == "flags":
            names = flag_names(values["op"], values["type"], value)
            shown = f"{value:#010x}" + (f" ({', '.join(names)})" if names else "")
        elif enum is not None:
            shown += f" ({enum_name(enum, value)})"
        elif f.name.endswith("cid"):
            shown = cid_label(value)
        lines.append(f"    {f.name + ':':<11} {shown}")
    return lines


def hexdump(data: bytes, limit: int | None = 256, offset_digits: int = 4) -> list[str]:
    """Classic 16-bytes-a-line hex dump of the first ``limit`` bytes (all with None), the
    offset in ``offset_digits`` hex digits (``follow --hex`` shows whole streams: 8)."""
    end = len(data) if limit is None else min(len(data), limit)
    lines = []
    for off in range(0, end, 16):
        chunk = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:0{offset_digits}x}  {chunk.hex(' '):<47}  {text}")
    if end < len(data):
        lines.append(f"… {len(data) - end} more bytes")
    return lines


# -- the bulk path: lines and tables of a whole batch without a Python object per frame ----

_VIRTIO_ROW, _MON_ROW, _BARE_ROW = 0, 1, 2
_Item = tuple[Any, ...]
"""A template item of ``_render.format_rows``: a literal or a column to print."""


@dataclass(frozen=True)
class _Bulk:
    """The columns of rows ``idx`` (increasing) of ``fb`` that both bulk views print, and
    which of the three kinds of row each is (virtio, vsockmon header only, neither), so the
    line and the table read one set of columns."""

    fb: FrameBatch
    idx: np.ndarray
    v: np.ndarray
    m: np.ndarray
    hv: np.ndarray
    which: np.ndarray
    ends: dict[str, np.ndarray]
    vlen: np.ndarray
    shown: np.ndarray
    off: np.ndarray

    @classmethod
    def of(cls, fb: FrameBatch, idx: np.ndarray) -> _Bulk:
        sel = fb.rows(idx)
        v, m = fb.virtio[sel], fb.mon[sel]
        hv, hm = fb.has_virtio[sel], fb.has_mon[sel]
        which = np.where(hv, _VIRTIO_ROW, np.where(hm, _MON_ROW, _BARE_ROW)).astype(np.int8)
        ends = {name: np.where(hv, v[name], m[name]) for name in
                ("src_cid", "src_port", "dst_cid", "dst_port")}
        vlen = v["len"].astype(np.int64)
        plen = fb.payload_len[sel]
        shown = np.where(hv, np.where(vlen > 0, np.minimum(plen, vlen), 0), plen)
        return cls(fb, idx, v, m, hv, which, ends, vlen, shown.astype(np.int64),
                   fb.payload_off[sel])

    def number(self, width: int) -> _Item:
        return _render.K_INT, np.ascontiguousarray(self.fb.first + self.idx, dtype=np.int64), width

    def time(self, t0_ns: int, width: int) -> _Item:
        return _render.K_REL, self.fb.ts_ns[self.fb.rows(self.idx)], t0_ns, width

    def end(self, side: str) -> list[_Item]:
        """``cid:port`` of the ``src`` or ``dst`` end."""
        return [(_render.K_UINT, self.ends[f"{side}_cid"].astype(np.uint64)),
                (_render.K_LIT, b":"),
                (_render.K_INT, self.ends[f"{side}_port"].astype(np.int64), 0)]

    def virtio_int(self, name: str) -> _Item:
        return _render.K_INT, self.v[name].astype(np.int64), 0

    def preview(self, prefix: bytes) -> _Item:
        """:func:`preview` of the payload :func:`row` shows, after ``prefix`` where there is one."""
        return _render.K_PREVIEW, self.off, self.shown, self.fb.buf, PREVIEW_BYTES, prefix

    def flags(self, text: Callable[[int], str]) -> _Item:
        """The virtio flags by name, ``text`` of a key holding op, type and flags."""
        v = self.v
        return dictionary_column(v["op"].astype(np.int64) << 48
                                 | v["type"].astype(np.int64) << 32 | v["flags"], text)


def summary_lines(fb: FrameBatch, idx: np.ndarray, t0_ns: int,
                  payload_summary: Callable[[bytes, int, int], str | None] | None = None
                  ) -> bytes:
    """:func:`summary_line` of the rows ``idx`` (increasing) of ``fb``, each followed by a
    newline, as UTF-8, formatted by compiled code over the columns (a test holds the two
    equal on every fixture). ``payload_summary(payload, src_port, dst_port)`` is asked about
    each payload the line would show, as :func:`summary_line`'s ``payload_summary``."""
    return summary_rows(fb, idx, t0_ns, payload_summary).text()


def summary_rows(fb: FrameBatch, idx: np.ndarray, t0_ns: int,
                 payload_summary: Callable[[bytes, int, int], str | None] | None = None
                 ) -> Rows:
    """:func:`summary_lines` with the text itself not made yet (:class:`Rows`)."""
    b = _Bulk.of(fb, idx)
    v, m, hv = b.v, b.m, b.hv
    label = dictionary_column(np.where(hv, v["type"].astype(np.int64) << 16 | v["op"],
                              np.where(b.which == _MON_ROW,
                                       (1 << 32) | m["op"].astype(np.int64), 2 << 32)),
                              _label)
    anomalies = dictionary_column(fb.anomalies[fb.rows(idx)], _anomalies_text)
    summaries: list[bytes | None] = [None] * len(idx)
    if payload_summary is not None:
        sp, dp = v["src_port"].tolist(), v["dst_port"].tolist()
        for i in np.flatnonzero(hv & (b.vlen > 0)).tolist():
            o = int(b.off[i])
            text = payload_summary(fb.buf[o : o + int(b.shown[i])], sp[i], dp[i])
            summaries[i] = text.encode() if text is not None else None
    head = [b.number(6), (_render.K_LIT, b" "), b.time(t0_ns, 12), (_render.K_LIT, b"  ")]
    addr = [*b.end("src"), (_render.K_LIT, " → ".encode()), *b.end("dst"),
            (_render.K_LIT, b"  ")]
    tail = [b.preview(b" "), (_render.K_OPT, summaries, b" | "), anomalies]
    virtio_row = [*head, *addr, label, (_render.K_LIT, b" len="), b.virtio_int("len"),
                  b.flags(_flags_text), (_render.K_LIT, b" buf_alloc="),
                  b.virtio_int("buf_alloc"), (_render.K_LIT, b" fwd_cnt="),
                  b.virtio_int("fwd_cnt"), *tail]
    mon_row = [*head, *addr, label, *tail]
    bare_row = [*head, (_render.K_LIT, "? → ?  ".encode()), label, *tail]
    return Rows(len(idx), b.which, [virtio_row, mon_row, bare_row])


def table_text(fb: FrameBatch, idx: np.ndarray, t0_ns: int) -> bytes:
    """``tabulate([row(f, t0_ns) ...], headers=TABLE_HEADERS, disable_numparse=True)`` of
    the rows ``idx`` (increasing) of ``fb`` and a newline, as UTF-8: the cells formatted,
    measured and padded by compiled code (a test holds it equal to tabulate's)."""
    b = _Bulk.of(fb, idx)
    cells = _table_cells(b, t0_ns)
    templates = [[cells[name][kind] for name in TABLE_HEADERS]
                 for kind in (_VIRTIO_ROW, _MON_ROW, _BARE_ROW)]
    return _render.format_table(len(idx), b.which, templates, TABLE_HEADERS)


def _table_cells(b: _Bulk, t0_ns: int) -> dict[str, tuple[list[_Item], ...]]:
    """Each column of :func:`row`, by its header, as the items of its cell in a virtio row,
    a vsockmon-only row and a row with neither header: ``-`` for a virtio field a row does
    not have, ``?`` for ends it does not have."""
    dash: list[_Item] = [(_render.K_LIT, b"-")]
    unknown: list[_Item] = [(_render.K_LIT, b"?")]
    v, m = b.v, b.m
    op = [dictionary_column(np.where(b.hv, v["op"], (1 << 16) | m["op"].astype(np.int64)),
                            _op_name)]
    every = {"no": [b.number(0)], "time": [b.time(t0_ns, 0)], "payload": [b.preview(b"")]}
    return {
        **{name: (cell, cell, cell) for name, cell in every.items()},
        "source": (b.end("src"), b.end("src"), unknown),
        "destination": (b.end("dst"), b.end("dst"), unknown),
        "type": ([dictionary_column(v["type"], lambda t: enum_name(SockType, t))], dash, dash),
        "op": (op, op, dash),
        "flags": ([b.flags(_flags_cell)], dash, dash),
        **{name: ([b.virtio_int(name)], dash, dash) for name in ("len", "buf_alloc", "fwd_cnt")},
    }


def _op_name(key: int) -> str:
    """A virtio op's name, or (bit 16 set) a vsockmon header's op's."""
    return enum_name(MonOp, key & 0xFFFF) if key >> 16 else enum_name(Op, key)


def _flags_cell(key: int) -> str:
    return ",".join(_flag_names(key)) or "-"


def _label(key: int) -> str:
    """The ``type op`` of a line: names for a virtio row, ``- op`` for a vsockmon-only row."""
    if key >> 32 == 0:
        return f"{enum_name(SockType, key >> 16)} {enum_name(Op, key & 0xFFFF)}"
    if key >> 32 == 1:
        return f"- {enum_name(MonOp, key & 0xFFFF)}"
    return "- -"


def _flags_text(key: int) -> str:
    names = _flag_names(key)
    return f" [{','.join(names)}]" if names else ""


def _flag_names(key: int) -> list[str]:
    """:func:`flag_names` of a key of :meth:`_Bulk.flags`."""
    return flag_names(key >> 48, (key >> 32) & 0xFFFF, key & 0xFFFFFFFF)


def _anomalies_text(bits: int) -> str:
    return " !" + ",".join(anomaly_names(bits)) if bits else ""

