"""Display filters over frame fields: ``cid == 3 and op == RW``, ``flags has EOM``, ….

A filter compiles once into a function from a :class:`~vsockmon.decode.frames.FrameBatch` to a
boolean mask, so it costs a few numpy operations per batch, not Python work per packet.

Grammar (case-insensitive keywords and names)::

    expr    := or
    or      := and (("or" | "||") and)*
    and     := unary (("and" | "&&") unary)*
    unary   := ("not" | "!") unary | "(" expr ")" | test
    test    := FIELD [CMP VALUE | "has" NAME]
    CMP     := == != < <= > >=

``cid`` and ``port`` match either end; ``cid != 3`` means "neither end is 3". A bare field is
true when non-zero; ``anomaly`` alone is true for frames with any anomaly. Values are numbers
(decimal or 0x hex) or the field's enum names (``RW``, ``SEQPACKET``, ``PAYLOAD``, ``VIRTIO``).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from vsockmon.decode.frames import ANOMALY_NAMES, FrameBatch
from vsockmon.errors import VsockmonError
from vsockmon.wire.protocol import (
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Op,
    SeqFlag,
    ShutdownFlag,
    SockType,
    parse_cid,
)

Mask = np.ndarray
Column = Callable[[FrameBatch], np.ndarray]


class FilterError(VsockmonError, ValueError):
    """A filter that does not parse or names an unknown field or value (one line)."""


@dataclass(frozen=True)
class _Field:
    columns: tuple[Column, ...]
    """One column, or several for fields that match either end (cid, port)."""
    present: Callable[[FrameBatch], np.ndarray]
    enum: type[IntEnum] | None = None


def _virtio(name: str) -> Column:
    return lambda fb: fb.virtio[name]


def _mon(name: str) -> Column:
    return lambda fb: fb.mon[name]


def _always(fb: FrameBatch) -> np.ndarray:
    return np.ones(len(fb), dtype=bool)


def _has_virtio(fb: FrameBatch) -> np.ndarray:
    return fb.has_virtio


def _has_mon(fb: FrameBatch) -> np.ndarray:
    return fb.has_mon


def _build_fields() -> dict[str, _Field]:
    fields: dict[str, _Field] = {}
    for f in VIRTIO_HEADER.fields:
        spec = _Field((_virtio(f.name),), _has_virtio, f.enum)
        fields[f.json_key] = fields[f.name] = spec
    for f in VSOCKMON_HEADER.fields:
        spec = _Field((_mon(f.name),), _has_mon, f.enum)
        fields[f.json_key] = fields[f"mon.{f.name}"] = spec
    fields["trans"] = fields["vsock.trans"]
    fields["cid"] = _Field((_virtio("src_cid"), _virtio("dst_cid")), _has_virtio)
    fields["port"] = _Field((_virtio("src_port"), _virtio("dst_port")), _has_virtio)
    frame_cols: dict[str, Column] = {
        "frame.number": lambda fb: fb.first + np.arange(len(fb)),
        "frame.len": lambda fb: fb.orig_len,
        "frame.cap_len": lambda fb: fb.caplen,
        "payload_len": lambda fb: fb.payload_len,
        "anomaly": lambda fb: fb.anomalies,
    }
    for name, col in frame_cols.items():
        fields[name] = _Field((col,), _always)
    fields["frame"] = fields["frame.number"]
    fields["anomalies"] = fields["anomaly"]
    return fields


FIELDS = _build_fields()

_FLAG_OWNER: dict[str, tuple[int, Op, SockType | None]] = {
    **{name.lower(): (int(m), Op.SHUTDOWN, None) for name, m in ShutdownFlag.__members__.items()},
    **{name.lower(): (int(m), Op.RW, SockType.SEQPACKET)
       for name, m in SeqFlag.__members__.items()},
}
"""Flag name → (bit, the op it belongs to, the type it needs): EOM means nothing on SHUTDOWN."""
_ANOMALY_BITS = {name: int(bit) for bit, name in ANOMALY_NAMES.items()}
_CMPS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
_TOKEN = re.compile(r"\s*(?:(==|!=|<=|>=|<|>|&&|\|\||!|\(|\))|([A-Za-z0-9_.\-]+))")


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            rest = text[pos:].lstrip()  # the column of the odd character, not of the blank
            raise FilterError(f"bad filter: unexpected {rest[:10]!r} "
                              f"at column {len(text) - len(rest) + 1}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


MAX_DEPTH = 100
"""Parentheses and ``not`` nested deeper than this are refused: the parser and the compiled
filter recurse once per level, and Python's stack is not the user's problem."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0
        if not self.tokens:
            raise FilterError("bad filter: empty expression")

    def peek(self) -> str | None:
        return self.tokens[self.pos].lower() if self.pos < len(self.tokens) else None

    def take(self) -> str:
        if self.pos >= len(self.tokens):
            raise FilterError("bad filter: expression ends too early")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def parse(self) -> Callable[[FrameBatch], Mask]:
        node = self.or_()
        if self.pos != len(self.tokens):
            raise FilterError(f"bad filter: unexpected {self.tokens[self.pos]!r}")
        return node

    def or_(self) -> Callable[[FrameBatch], Mask]:
        terms = [self.and_()]
        while self.peek() in ("or", "||"):
            self.take()
            terms.append(self.and_())
        return _combine(operator.or_, terms)

    def and_(self) -> Callable[[FrameBatch], Mask]:
        terms = [self.unary()]
        while self.peek() in ("and", "&&"):
            self.take()
            terms.append(self.unary())
        return _combine(operator.and_, terms)

    def unary(self) -> Callable[[FrameBatch], Mask]:
        tok = self.peek()
        if tok not in ("not", "!", "("):
            return self.test()
        self.take()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"bad filter: nested deeper than {MAX_DEPTH} levels")
        if tok == "(":
            inner = self.or_()
            if self.peek() != ")":
                raise FilterError("bad filter: missing ')'")
            self.take()
        else:
            negated = self.unary()
            inner = lambda fb: ~negated(fb)  # noqa: E731
        self.depth -= 1
        return inner

    def test(self) -> Callable[[FrameBatch], Mask]:
        name = self.take().lower()
        field = FIELDS.get(name)
        if field is None:
            raise FilterError(f"bad filter: unknown field {name!r} "
                              f"(try cid, port, op, type, len, flags, buf_alloc, fwd_cnt)")
        nxt = self.peek()
        if nxt == "has":
            self.take()
            return _has(name, field, self.take())
        if nxt in _CMPS:
            cmp = _CMPS[self.take()]
            value = _value(name, field, self.take())
            return _compare(field, cmp, value, negate=nxt == "!=")
        return _compare(field, operator.ne, 0, negate=False)


def _combine(op: Callable[[Mask, Mask], Mask], terms: list[Callable[[FrameBatch], Mask]]
             ) -> Callable[[FrameBatch], Mask]:
    """``a op b op c …`` as one flat fold: a chain of thousands of terms costs no stack."""
    if len(terms) == 1:
        return terms[0]
    return lambda fb: functools.reduce(op, (term(fb) for term in terms))


def _compare(field: _Field, cmp: Callable[[np.ndarray, int], np.ndarray], value: int,
             negate: bool) -> Callable[[FrameBatch], Mask]:
    """A mask for ``field CMP value``; multi-column fields match if any end matches."""
    if negate and len(field.columns) > 1:
        positive = _compare(field, operator.eq, value, negate=False)
        return lambda fb: field.present(fb) & ~positive(fb)

    def mask(fb: FrameBatch) -> Mask:
        hit = np.zeros(len(fb), dtype=bool)
        for col in field.columns:
            hit |= cmp(col(fb).astype(np.int64), value)
        return hit & field.present(fb)

    return mask


def _has(name: str, field: _Field, raw: str) -> Callable[[FrameBatch], Mask]:
    """``anomaly has NAME`` or ``flags has NAME``; a flag bit counts only on its own op."""
    table = _ANOMALY_BITS if name in ("anomaly", "anomalies") else _FLAG_OWNER
    entry = table.get(raw.lower())
    if entry is None or name not in ("anomaly", "anomalies", "flags", "vsock.virtio.flags"):
        raise FilterError(f"bad filter: {name} has no bit named {raw!r} "
                          f"(known: {', '.join(sorted(table))})")
    col = field.columns[0]
    if isinstance(entry, int):
        return lambda fb: (col(fb).astype(np.int64) & entry) != 0
    bit, op, sock_type = entry

    def mask(fb: FrameBatch) -> Mask:
        hit = field.present(fb) & ((col(fb).astype(np.int64) & bit) != 0)
        hit &= fb.virtio["op"] == op
        if sock_type is not None:
            hit &= fb.virtio["type"] == sock_type
        return hit

    return mask


def _value(name: str, field: _Field, raw: str) -> int:
    if name.endswith("cid"):  # cid, src_cid, vsock.dst_cid…: names of reserved CIDs too
        try:
            return parse_cid(raw)
        except ValueError as e:
            raise FilterError(f"bad filter: {e}") from None
    try:
        return int(raw, 0)
    except ValueError:
        pass
    enum = field.enum  # from the field table: op, type, mon.op and trans have one
    if enum is not None:
        for member in enum:
            if member.name.lower() == raw.lower():
                return int(member)
        known = ", ".join(m.name for m in enum)
        raise FilterError(f"bad filter: {raw!r} is not a value of {name} (known: {known})")
    raise FilterError(f"bad filter: {raw!r} is not a number")


def compile_filter(text: str) -> Callable[[FrameBatch], Mask]:
    """Compile a filter expression; raises :class:`FilterError` with a one-line reason."""
    return _Parser(text).parse()
