"""Compare our decoding with Wireshark's, field by field.

Wireshark is the oracle for every field it decodes; where it is wrong (op 7 named "Credit
response", type 2 unnamed, flag bits not decoded) the report says so instead of calling it a
disagreement. The mapping between our JSON keys and Wireshark's field names comes from the
field tables. Used by ``vsockmon decode --verify`` (through pyshark) and by the tests
(through ``tshark -T fields``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from vsockmon.decode.frames import decode_batches
from vsockmon.errors import VsockmonError
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import VIRTIO_HEADER, VSOCKMON_HEADER, Op, SockType

WS_OF_KEY: dict[str, str] = {
    f.json_key: f.wireshark for h in (VSOCKMON_HEADER, VIRTIO_HEADER) for f in h.fields
}
"""Our JSON key → Wireshark's field name (``vsock.virtio.src_port`` → ``…src_prot``)."""
WS_PAYLOAD = "vsock.payload"
WS_FRAME = ("frame.time_epoch", "frame.len", "frame.cap_len")
"""Wireshark's own frame fields: the time (as its decimal string) and both lengths."""
TSHARK_FIELDS = ("frame.number", *WS_FRAME, *WS_OF_KEY.values(), WS_PAYLOAD)
PAYLOAD_LEN_MISMATCH = "payload-len-mismatch"
NO_TSHARK = "tshark is not installed (apt-get install tshark)"


class VerifyError(VsockmonError):
    """Wireshark could not be run on the file (one line)."""


@dataclass(frozen=True)
class Disagreement:
    frame: int
    key: str
    ours: Any
    wireshark: Any


@dataclass
class Report:
    frames: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)
    wireshark_errors: dict[str, list[int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"frame {d.frame}: {d.key}: vsockmon {d.ours!r}, Wireshark {d.wireshark!r}"
               for d in self.disagreements]
        for what, frames in self.wireshark_errors.items():
            shown = ", ".join(map(str, frames[:10])) + (" …" if len(frames) > 10 else "")
            out.append(f"known Wireshark error: {what} (frames {shown})")
        if self.disagreements:
            out.append(f"{self.frames} frames compared: {len(self.disagreements)} fields differ")
        else:
            out.append(f"{self.frames} frames compared: vsockmon and Wireshark agree on "
                       "every field")
        return out


def ws_value(raw: str) -> int | None:
    """A Wireshark field value as an integer: decimal, ``0x`` hex, or bytes as hex."""
    if raw == "":
        return None
    try:
        return int(raw, 0)
    except ValueError:
        return int(raw.replace(":", ""), 16)


def epoch_ns(raw: str) -> int | None:
    """Wireshark's ``frame.time_epoch`` (``1700000000.123456789``) as integer nanoseconds,
    read as a decimal string: a float holds only about 16 digits, a time to the ns has 19."""
    try:
        return int(Decimal(raw).scaleb(9))
    except InvalidOperation:
        return None


def payload_len_mismatch(theirs: Mapping[str, str]) -> bool | None:
    """Whether the payload-length anomaly is due, from Wireshark's lengths alone: the whole
    packet was captured (``frame.len == frame.cap_len``), its headers fit, and the payload
    bytes Wireshark shows differ from the virtio ``len``. ``None`` without a virtio header."""
    vlen = ws_value(theirs.get(WS_OF_KEY["vsock.virtio.len"], ""))
    trans_len = ws_value(theirs.get(WS_OF_KEY["vsock.trans_len"], ""))
    if vlen is None or trans_len is None:
        return None
    wire, cap = int(theirs["frame.len"]), int(theirs["frame.cap_len"])
    whole = wire == cap and cap >= VSOCKMON_HEADER.size + trans_len
    return whole and len(theirs.get(WS_PAYLOAD, "").replace(":", "")) // 2 != vlen


def ws_payload_len(theirs: Mapping[str, str]) -> int:
    """The payload bytes Wireshark has for a frame. On a frame cut by the snap length it
    shows none ("Packet size limited during capture": it wants the announced bytes), so
    there it is what its own lengths leave after the headers."""
    shown = len(theirs.get(WS_PAYLOAD, "").replace(":", "")) // 2
    trans_len = ws_value(theirs.get(WS_OF_KEY["vsock.trans_len"], ""))
    wire, cap = ws_value(theirs.get("frame.len", "")), ws_value(theirs.get("frame.cap_len", ""))
    if shown or trans_len is None or wire is None or cap is None or wire <= cap:
        return shown
    return max(cap - VSOCKMON_HEADER.size - trans_len, 0)


def compare(ours: Mapping[str, Any], theirs: Mapping[str, str]) -> list[Disagreement]:
    """Every field where our flat JSON object and Wireshark's fields for a frame differ:
    the header fields, the time to the ns, both lengths, the payload length and the
    payload-length anomaly."""
    number = ours["frame.number"]
    pairs: list[tuple[str, Any, Any]] = [
        ("frame.time_ns", ours["frame.time_ns"], epoch_ns(theirs.get("frame.time_epoch", ""))),
        ("frame.len", ours["frame.len"], ws_value(theirs.get("frame.len", ""))),
        ("frame.cap_len", ours["frame.cap_len"], ws_value(theirs.get("frame.cap_len", ""))),
    ]
    pairs += [(key, ours.get(key), ws_value(theirs.get(ws, ""))) for key, ws in WS_OF_KEY.items()]
    pairs.append(("payload_len", ours["payload_len"], ws_payload_len(theirs)))
    due = payload_len_mismatch(theirs)
    if due is not None:
        pairs.append((f"anomalies: {PAYLOAD_LEN_MISMATCH}",
                      PAYLOAD_LEN_MISMATCH in ours["anomalies"], due))
    return [Disagreement(number, key, got, want) for key, got, want in pairs if got != want]


def known_errors(ours: Mapping[str, Any]) -> list[str]:
    """Where Wireshark is wrong about this frame, in words."""
    out = []
    if ours.get("vsock.virtio.op") == Op.CREDIT_REQUEST:
        out.append("op 7 is CREDIT_REQUEST, Wireshark says 'Credit response'")
    if ours.get("vsock.virtio.type") == SockType.SEQPACKET:
        out.append("type 2 is SEQPACKET, Wireshark says 'Unknown (2)'")
    if ours.get("vsock.virtio.flags"):
        out.append("flag bits not decoded by Wireshark (we name them)")
    if ours["frame.len"] > ours["frame.cap_len"] and ours["payload_len"]:
        out.append("payload of a frame cut by the snap length not shown by Wireshark "
                   "(compared with the length its headers leave)")
    return out


def build_report(ours: Iterable[Mapping[str, Any]], theirs: Iterable[Mapping[str, str]]
                 ) -> Report:
    report = Report()
    for mine, ws in zip(ours, theirs, strict=False):
        report.frames += 1
        report.disagreements += compare(mine, ws)
        for what in known_errors(mine):
            report.wireshark_errors.setdefault(what, []).append(mine["frame.number"])
    return report


def our_records(path: str, count: int | None = None) -> Iterator[dict[str, Any]]:
    with open_capture(path) as reader:
        n = 0
        for fb in decode_batches(reader.batches()):
            for rec in fb.records():
                if count is not None and n >= count:
                    return
                n += 1
                yield rec


def tshark_records(path: str) -> Iterator[dict[str, str]]:
    """Wireshark's values for our fields, one dict per frame, via ``tshark -T fields``."""
    cmd = ["tshark", "-n", "-r", path, "-T", "fields", "-E", "separator=\t"]
    for name in TSHARK_FIELDS:
        cmd += ["-e", name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise VerifyError(NO_TSHARK) from None
    except subprocess.CalledProcessError as e:
        raise VerifyError(f"tshark failed: {e.stderr.strip().splitlines()[-1]}") from None
    for line in out.splitlines():
        yield dict(zip(TSHARK_FIELDS, line.split("\t"), strict=True))


def _pyshark_records(path: str) -> Iterator[dict[str, str]]:
    import pyshark

    cap = pyshark.FileCapture(path, keep_packets=False, disable_protocol=None)
    try:
        for pkt in cap:
            layer = getattr(pkt, "vsock", None)
            rec: dict[str, str] = {}
            for ws in WS_FRAME:
                rec[ws] = pkt.frame_info.get_field(ws.removeprefix("frame.")).show
            if layer is not None:
                for ws in (*WS_OF_KEY.values(), WS_PAYLOAD):
                    name = ws.removeprefix("vsock.").replace(".", "_")
                    value = layer.get_field(name)
                    if value is not None:
                        rec[ws] = value.raw_value if ws in (WS_PAYLOAD, "vsock.reserved") \
                            else value.show
            yield rec
    finally:
        cap.close()


def verify_with_pyshark(path: str, count: int | None = None) -> Report:
    """Re-read ``path`` through Wireshark's dissector (pyshark) and compare every field.

    pyshark looks for tshark itself and says so with its own exception, not an OSError."""
    try:
        from pyshark.tshark.tshark import TSharkNotFoundException
    except ImportError:
        raise VerifyError("pyshark is not installed (pip install pyshark)") from None
    try:
        return build_report(our_records(path, count), _pyshark_records(path))
    except TSharkNotFoundException:
        raise VerifyError(NO_TSHARK) from None
    except OSError as e:
        raise VerifyError(f"cannot run tshark through pyshark: {e}") from None
