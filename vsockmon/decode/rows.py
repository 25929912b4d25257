"""Rows of text made by compiled code from columns, formatted when and where the caller wants.

:func:`~vsockmon.decode.render.summary_rows` and
:meth:`~vsockmon.decode.frames.FrameBatch.json_rows` gather the columns and templates of
some rows (numpy: that needs the GIL); :class:`Rows` holds them until the text is made
(compiled: it lets go of the GIL). ``decode`` hands them to a
:class:`~vsockmon.output.BackgroundWriter`, so the text of these rows is made and written
on the other core while the next rows are gathered.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, BinaryIO

from vsockmon.decode import _render

PIECE = 4096
"""Rows formatted per write to a file descriptor: their text (3 MB of JSON) is a buffer
reused, still in cache; a whole batch's (24 MB) is fresh memory the kernel faults in page by
page, which cost 0.3 CPU s per million packets (measured; lines, 8x shorter, do not gain)."""


@dataclass(frozen=True)
class Rows:
    """``count`` rows, row i written with ``templates[which[i]]`` (see ``_render.c``)."""

    count: int
    which: Any
    templates: list[Any]

    def text(self) -> bytes:
        """The rows' text, each row followed by a newline."""
        return _render.format_rows(self.count, self.which, self.templates)

    def write(self, out: BinaryIO) -> None:
        """Write :meth:`text` to ``out``: straight to its file descriptor, a piece at a time,
        when it has one (after what ``out`` holds buffered), else through ``out.write``."""
        fd = _fileno(out)
        if fd is None:
            out.write(self.text())
            return
        out.flush()
        _render.write_rows(fd, self.count, self.which, self.templates, PIECE)


def _fileno(out: BinaryIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
