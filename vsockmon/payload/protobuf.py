"""Just enough of the protobuf wire format to read ttrpc envelopes without their schemas.

Only the encoding is decoded (field number, wire type, raw value); meaning comes from the
caller, which knows which fields it expects. Groups (wire types 3 and 4, deprecated) are
refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class ProtobufError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


@dataclass(frozen=True)
class PbField:
    """One encoded field: ``value`` is an int for numeric wire types, bytes for LEN."""

    number: int
    wire_type: int
    value: int | bytes
    offset: int
    """Where the field's key starts in the message."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ProtobufError("varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[PbField]:
    """The fields of a message in wire order; raises :class:`ProtobufError` on bad bytes."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire_type in (I64, I32):
            width = 8 if wire_type == I64 else 4
            if pos + width > len(buf):
                raise ProtobufError("truncated fixed-width field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire_type == LEN:
            size, pos = read_varint(buf, pos)
            if pos + size > len(buf):
                raise ProtobufError("length-delimited field runs past the end")
            value = bytes(buf[pos : pos + size])
            pos += size
        else:
            raise ProtobufError(f"unsupported wire type {wire_type}")
        yield PbField(number, wire_type, value, start)


def parse(buf: bytes) -> dict[int, list[int | bytes]]:
    """Field number → values (repeated fields keep every value, in order)."""
    out: dict[int, list[int | bytes]] = {}
    for f in fields(buf):
        out.setdefault(f.number, []).append(f.value)
    return out


def to_signed(value: int, bits: int = 64) -> int:
    """A varint read as a two's complement int32/int64 (negative ints use all 10 bytes)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def encode_varint(value: int) -> bytes:
    """The varint encoding of a non-negative int (used to build test and lab messages)."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_field(number: int, value: int | bytes | str) -> bytes:
    """One field: ints as varints, bytes and str as length-delimited."""
    if isinstance(value, int):
        return encode_varint(number << 3 | VARINT) + encode_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return encode_varint(number << 3 | LEN) + encode_varint(len(data)) + data
