"""JSON messages, as qemu-guest-agent (QMP style) and many ad-hoc vsock services send them.

A payload may hold several values one after another (newline-delimited JSON); a value cut
by the end of the payload is reported as incomplete, not as an error.
"""

from __future__ import annotations

import json
from typing import Any

from vsockmon.payload.model import Node, PayloadInfo, shorten
from vsockmon.payload.registry import PayloadDissector

_DECODER = json.JSONDecoder()
_QMP_KEYS = ("execute", "return", "error", "event", "QMP")


def detect(payload: bytes) -> bool:
    return payload.lstrip()[:1] in (b"{", b"[")


def _values(text: str) -> tuple[list[Any], int]:
    """The complete JSON values in ``text`` and the offset where parsing stopped."""
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return values, pos
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, pos
        values.append(value)


def _node(label: str, value: Any, depth: int = 0) -> Node:
    if depth < 8 and isinstance(value, dict) and value:
        return Node(label, tuple(_node(f"{k}", v, depth + 1) for k, v in value.items()))
    if depth < 8 and isinstance(value, list) and value:
        return Node(f"{label} [{len(value)}]",
                    tuple(_node(f"[{i}]", v, depth + 1) for i, v in enumerate(value)))
    return Node(f"{label}: {json.dumps(value, ensure_ascii=False)}")


def _summary(value: Any) -> str:
    """QMP messages by their verb (``execute guest-ping``), others compactly."""
    if isinstance(value, dict):
        for key in _QMP_KEYS:
            if key in value:
                arg = value[key]
                detail = arg if isinstance(arg, str) else json.dumps(arg, ensure_ascii=False)
                return shorten(f"{key} {detail}", 60)
    return shorten(json.dumps(value, ensure_ascii=False, separators=(",", ":")), 60)


def dissect(payload: bytes) -> PayloadInfo | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    values, stop = _values(text)
    rest = len(text) - stop
    if not values:
        return PayloadInfo("json", f"incomplete, {len(payload)} bytes",
                           (Node(f"Incomplete JSON value: {len(payload)} bytes"),),
                           {"json.incomplete": True})
    summary = "; ".join(_summary(v) for v in values)
    tree = [_node(f"Value {i + 1}" if len(values) > 1 else "Value", v)
            for i, v in enumerate(values)]
    if rest:
        summary += f" (+{rest} bytes incomplete)"
        tree.append(Node(f"Incomplete trailing JSON: {rest} bytes"))
    fields: dict[str, Any] = {"json.values": len(values)}
    first = values[0]
    if isinstance(first, dict):
        fields.update({f"json.{k}": first[k] for k in _QMP_KEYS if isinstance(first.get(k), str)})
    return PayloadInfo("json", summary, tuple(tree), fields)


DISSECTOR = PayloadDissector(
    "json", dissect, detect=detect, priority=30, description="JSON messages (QMP style)",
)
