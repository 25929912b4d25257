"""What a payload dissector returns: a one-line summary, a tree and flat fields.

Kept free of any dissector so that callers (decode's ``-V`` tree, follow, timeline, export)
depend on this shape alone, never on a particular protocol module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): what a payload
    says is shown, and must neither break a one-line view in two nor send escape sequences
    to the user's terminal (found by fuzzing the decoder)."""
    return text.translate(_CONTROLS)


@dataclass(frozen=True)
class Node:
    """One line of a dissection tree and the lines below it (control characters escaped)."""

    label: str
    children: tuple[Node, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", printable(self.label))

    def walk(self, depth: int = 0) -> Iterator[tuple[int, str]]:
        """(depth, label) of this node and its descendants, depth first."""
        yield depth, self.label
        for child in self.children:
            yield from child.walk(depth + 1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label}
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass(frozen=True)
class PayloadInfo:
    """A dissected payload.

    ``protocol`` is the dissector's short name (``ttrpc``, ``json``…), ``summary`` one line
    for list views, ``tree`` the detail view, ``fields`` flat ``protocol.field`` → value pairs
    for filters and exports (the names follow the Wireshark plugin's fields where both exist).
    """

    protocol: str
    summary: str
    tree: tuple[Node, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # one line, whatever the payload held
        object.__setattr__(self, "summary", printable(self.summary))

    def lines(self, indent: str = "  ") -> list[str]:
        """The tree as indented text lines, the protocol's own line first."""
        out = [f"{self.protocol}: {self.summary}"]
        for node in self.tree:
            out.extend(f"{indent * (depth + 1)}{label}" for depth, label in node.walk())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "summary": self.summary,
            "fields": dict(self.fields),
            "tree": [n.to_dict() for n in self.tree],
        }


def shorten(text: str, limit: int = 80) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
