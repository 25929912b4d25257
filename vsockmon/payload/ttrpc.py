"""ttrpc, the Kata Containers agent's RPC framing (vsock port 1024).

A message is a 10-byte big-endian header — body length u32, stream id u32, type u8, flags
u8 — and a protobuf body: a request names ``service`` (1) and ``method`` (2) and carries
``payload`` (3), ``timeout_nano`` (4) and ``metadata`` (5); a response carries a
``google.rpc.Status`` (1: code, message) and ``payload`` (2); a data message carries raw
stream bytes. One vsock payload may hold several messages, or a piece of a large one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vsockmon.payload import protobuf
from vsockmon.payload.model import Node, PayloadInfo
from vsockmon.payload.registry import PayloadDissector

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size
MAX_MESSAGE = 4 << 20
"""ttrpc refuses bodies larger than 4 MiB: a bigger length means this is not ttrpc."""
KATA_AGENT_PORT = 1024


class MsgType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class MsgFlag(IntFlag):
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
"""google.rpc.Code names by value, as ttrpc responses carry them."""


def code_name(code: int) -> str:
    return GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else f"CODE({code})"


@dataclass(frozen=True)
class Message:
    """One ttrpc message; ``body`` is shorter than ``length`` when the payload ends first."""

    length: int
    stream_id: int
    type: int
    flags: int
    body: bytes

    @property
    def complete(self) -> bool:
        return len(self.body) == self.length

    @property
    def type_name(self) -> str:
        try:
            return MsgType(self.type).name.lower()
        except ValueError:
            return f"type({self.type})"


def header_ok(length: int, msg_type: int) -> bool:
    return length <= MAX_MESSAGE and msg_type in MsgType._value2member_map_


def split(payload: bytes) -> tuple[list[Message], int]:
    """The messages that start in ``payload`` (the last may be partial) and the number of
    leading bytes that are not a message header (a continuation of an earlier message)."""
    messages: list[Message] = []
    pos = 0
    while len(payload) - pos >= HEADER_LEN:
        length, stream_id, msg_type, flags = HEADER.unpack_from(payload, pos)
        if not header_ok(length, msg_type):
            break
        body = payload[pos + HEADER_LEN : pos + HEADER_LEN + length]
        messages.append(Message(length, stream_id, msg_type, flags, body))
        pos += HEADER_LEN + len(body)
    return messages, (len(payload) if not messages else 0)


def detect(payload: bytes) -> bool:
    """Strict: complete messages that tile the payload exactly, requests naming a service."""
    if len(payload) < HEADER_LEN or payload[0]:  # a length's first byte is 0 (MAX_MESSAGE)
        return False
    length, _, msg_type, _ = HEADER.unpack_from(payload)
    if not header_ok(length, msg_type) or HEADER_LEN + length > len(payload):
        return False  # no whole first message: what split would find, without splitting
    messages, _ = split(payload)
    if not messages or not all(m.complete for m in messages):
        return False
    if sum(HEADER_LEN + m.length for m in messages) != len(payload):
        return False
    try:
        return all(m.type != MsgType.REQUEST or _request(m.body)[0] for m in messages)
    except protobuf.ProtobufError:
        return False


def _text(value: int | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _request(body: bytes) -> tuple[str, str, dict[int, list[int | bytes]]]:
    """(service, method, all fields); a partial body yields what its prefix holds."""
    parsed: dict[int, list[int | bytes]] = {}
    try:
        for f in protobuf.fields(body):
            parsed.setdefault(f.number, []).append(f.value)
    except protobuf.ProtobufError:
        if not parsed:
            raise
    return _text(parsed.get(1, [None])[0]), _text(parsed.get(2, [None])[0]), parsed


def _response(body: bytes) -> tuple[int, str, int]:
    """(status code, status message, payload length)."""
    parsed = protobuf.parse(body)
    code, message = 0, ""
    status = parsed.get(1, [b""])[0]
    if isinstance(status, bytes) and status:
        inner = protobuf.parse(status)
        raw_code = inner.get(1, [0])[0]
        code = protobuf.to_signed(raw_code, 32) if isinstance(raw_code, int) else 0
        message = _text(inner.get(2, [None])[0])
    payload = parsed.get(2, [b""])[0]
    return code, message, len(payload) if isinstance(payload, bytes) else 0


def describe(m: Message) -> tuple[str, Node, dict[str, object]]:
    """Summary text, tree node and flat fields of one message."""
    flags = [str(f.name).lower() for f in MsgFlag if m.flags & f]
    kids = [
        Node(f"Length: {m.length}"),
        Node(f"Stream ID: {m.stream_id}"),
        Node(f"Type: {m.type_name} ({m.type})"),
        Node(f"Flags: {m.flags:#04x}" + (f" ({', '.join(flags)})" if flags else "")),
    ]
    fields: dict[str, object] = {
        "ttrpc.length": m.length, "ttrpc.stream_id": m.stream_id,
        "ttrpc.type": m.type_name, "ttrpc.flags": m.flags,
    }
    summary = f"{m.type_name} #{m.stream_id}"
    try:
        if m.type == MsgType.REQUEST:
            service, method, parsed = _request(m.body)
            if service:
                kids.append(Node(f"Service: {service}"))
                fields["ttrpc.service"] = service
            if method:
                full = f"{service}/{method}"
                summary += f" {full}"
                kids.append(Node(f"Method: {full}"))
                fields["ttrpc.method"] = full
            timeout = parsed.get(4, [0])[0]
            if isinstance(timeout, int) and timeout:
                kids.append(Node(f"Timeout: {timeout} ns"))
                fields["ttrpc.timeout_ns"] = timeout
            payload = parsed.get(3, [b""])[0]
            if isinstance(payload, bytes):
                kids.append(Node(f"Payload: {len(payload)} bytes"))
            for kv in parsed.get(5, []):
                if isinstance(kv, bytes):
                    pair = protobuf.parse(kv)
                    key, val = _text(pair.get(1, [None])[0]), _text(pair.get(2, [None])[0])
                    kids.append(Node(f"Metadata: {key}={val}"))
        elif m.type == MsgType.RESPONSE and m.complete:
            code, message, size = _response(m.body)
            summary += f" {code_name(code)}" + (f": {message}" if message else "")
            kids += [Node(f"Status: {code_name(code)} ({code})"), Node(f"Payload: {size} bytes")]
            if message:
                kids.append(Node(f"Status message: {message}"))
            fields.update({"ttrpc.status.code": code, "ttrpc.status.name": code_name(code)})
            if message:
                fields["ttrpc.status.message"] = message
        elif m.type == MsgType.DATA:
            summary += f" {len(m.body)} bytes"
    except protobuf.ProtobufError as e:
        if m.complete:  # a partial body is cut, not malformed
            kids.append(Node(f"Malformed body: {e}"))
            summary += " (malformed)"
    if not m.complete:
        summary += f" (partial, {len(m.body)} of {m.length} bytes)"
    return summary, Node(f"ttrpc {m.type_name}, stream {m.stream_id}", tuple(kids)), fields


def dissect(payload: bytes) -> PayloadInfo:
    """All messages starting in ``payload``; a payload without a header is a continuation."""
    messages, lead = split(payload)
    if not messages:
        return PayloadInfo("ttrpc", f"continuation, {lead} bytes",
                           (Node(f"Continuation of an earlier message: {lead} bytes"),),
                           {"ttrpc.continuation": lead})
    parts = [describe(m) for m in messages]
    fields = dict(parts[0][2])
    fields["ttrpc.messages"] = len(messages)
    return PayloadInfo("ttrpc", "; ".join(p[0] for p in parts), tuple(p[1] for p in parts),
                       fields)


# -- building (tests and the lab's client/server speak ttrpc with these) -----------------


def encode(stream_id: int, msg_type: int, body: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(body), stream_id, msg_type, flags) + body


def encode_request(stream_id: int, service: str, method: str, payload: bytes = b"",
                   timeout_ns: int = 0, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = protobuf.encode_field(1, service) + protobuf.encode_field(2, method)
    body += protobuf.encode_field(3, payload)
    if timeout_ns:
        body += protobuf.encode_field(4, timeout_ns)
    for key, value in metadata:
        body += protobuf.encode_field(5, protobuf.encode_field(1, key)
                                      + protobuf.encode_field(2, value))
    return encode(stream_id, MsgType.REQUEST, body)


def encode_response(stream_id: int, payload: bytes = b"", code: int = 0,
                    message: str = "") -> bytes:
    status = b""
    if code or message:
        status = protobuf.encode_field(1, code) + (
            protobuf.encode_field(2, message) if message else b"")
    body = (protobuf.encode_field(1, status) if status else b"")
    body += protobuf.encode_field(2, payload)
    return encode(stream_id, MsgType.RESPONSE, body)


DISSECTOR = PayloadDissector(
    "ttrpc", dissect, ports=frozenset({KATA_AGENT_PORT}), detect=detect, priority=10,
    description="ttrpc framing (Kata Containers agent)",
)
