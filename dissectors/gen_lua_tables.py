#!/usr/bin/env python3
"""Regenerate the field-table block of vsockmon.lua from vsockmon/wire/protocol.py.

The plugin reads the headers from the frame's bytes itself (Wireshark builds no protocol
tree on a first pass without filters, so the built-in dissector's fields are not always
there to read), so it needs the offsets: they come from the one field table, through this
script. Run from the repository root: ``.venv/bin/python dissectors/gen_lua_tables.py``.
tests/test_wireshark.py fails when the block in the plugin is stale.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from pathlib import Path

from vsockmon.wire.protocol import (
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Header,
    Op,
    SeqFlag,
    ShutdownFlag,
    SockType,
    Transport,
)

PLUGIN = Path(__file__).resolve().parent / "vsockmon.lua"
BEGIN = "-- BEGIN field tables: generated from vsockmon/wire/protocol.py by gen_lua_tables.py"
END = "-- END field tables"


def _header(var: str, header: Header) -> str:
    rows = "\n".join(f"    {f.name} = {{ {f.offset}, {f.size} }}," for f in header.fields)
    return f"local {var} = {{ size = {header.size}, fields = {{\n{rows}\n}} }}"


def _enum(var: str, enum: type[IntEnum], with_names: bool = False) -> str:
    values = ", ".join(f"{m.name} = {m.value}" for m in enum)
    out = f"local {var} = {{ {values} }}"
    if with_names:
        names = ", ".join(f'[{m.value}] = "{m.name}"' for m in enum)
        out += f"\nlocal {var}_NAMES = {{ {names} }}"
    return out


def render() -> str:
    """The block, BEGIN and END lines included."""
    parts = [
        BEGIN,
        _header("MON_HDR", VSOCKMON_HEADER),
        _header("VIRTIO_HDR", VIRTIO_HEADER),
        _enum("TRANSPORT", Transport),
        _enum("OP", Op, with_names=True),
        _enum("TYPE", SockType, with_names=True),
        _enum("SHUT", ShutdownFlag),  # type: ignore[arg-type]
        _enum("SEQ", SeqFlag),  # type: ignore[arg-type]
        END,
    ]
    return "\n".join(parts)


def update(path: Path = PLUGIN) -> bool:
    """Rewrite the block in ``path``; True when it changed."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render() + text[end:]
    if new == text:
        return False
    path.write_text(new)
    return True


if __name__ == "__main__":
    print("updated" if update() else "up to date", file=sys.stderr)
