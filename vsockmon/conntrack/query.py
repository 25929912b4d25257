"""Choosing and ordering connections of a :class:`~vsockmon.conntrack.tracker.ConnTable`.

What ``vsockmon conns --cid/--port/--type/--close/--stream --sort`` do, column-wise on the
table so a million connections filter in milliseconds. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vsockmon.conntrack.records import RecordColumn
from vsockmon.conntrack.tracker import ConnTable


def matching(table: ConnTable, cids: Sequence[int] = (), ports: Sequence[int] = (),
             sock_type: str | None = None, closes: Sequence[str] = (),
             streams: Sequence[int] = ()) -> np.ndarray:
    """Indexes of the connections that pass every given filter (an empty filter passes),
    from the record arrays: no Python value per connection."""
    cols = table.record_columns()
    keep = np.ones(len(table), dtype=bool)
    if cids:
        keep &= np.isin(cols["client_cid"].values, cids) | np.isin(cols["server_cid"].values,
                                                                    cids)
    if ports:
        keep &= (np.isin(cols["client_port"].values, ports)
                 | np.isin(cols["server_port"].values, ports))
    if sock_type:
        keep &= _text_in(cols["type"], {sock_type.upper()})
    if closes:
        keep &= _text_in(cols["close"], set(closes))
    if streams:
        keep &= np.isin(cols["stream"].values, streams)
    return np.flatnonzero(keep)


def _text_in(col: RecordColumn, wanted: set[str]) -> np.ndarray:
    """Where a coded string column (type, close: never missing) is one of ``wanted``."""
    return np.isin(col.values, [i for i, text in enumerate(col.texts or ()) if text in wanted])


def order(table: ConnTable, rows: np.ndarray, field: str) -> np.ndarray:
    """``rows`` sorted by a record field ('-field': descending); missing values last."""
    descending = field.startswith("-")
    name = field.lstrip("-")
    col = table.record_columns()[name].python()  # this field's Python values only
    values = col[rows].tolist() if isinstance(col, np.ndarray) else [col[i] for i in rows]
    present = [i for i, v in enumerate(values) if v is not None]
    missing = [i for i, v in enumerate(values) if v is None]
    present.sort(key=values.__getitem__, reverse=descending)
    return rows[present + missing]
