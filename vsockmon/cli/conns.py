"""``vsockmon conns``: one line (or JSON object, or CSV row) per connection of a capture."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import click
import numpy as np

from vsockmon.analysis.pipeline import Analysis
from vsockmon.cli.reading import opened
from vsockmon.conntrack.query import matching, order
from vsockmon.conntrack.records import RecordColumn
from vsockmon.conntrack.tracker import CLOSES, RECORD_FIELDS, ConnTable
from vsockmon.decode import _render
from vsockmon.decode.rows import Rows
from vsockmon.diagnose.views import stream_summary
from vsockmon.output import BackgroundWriter
from vsockmon.wire.protocol import parse_cid

FIELD_NAMES = [f.name for f in RECORD_FIELDS]
CHUNK = 20000
"""Connections formatted at a time: output memory stays bounded."""


@dataclass(frozen=True)
class _Style:
    """How a record is written: JSON (``json.dumps(record)``) or a CSV row (``csv.writer``)."""

    start: str
    """Before the first field, then :attr:`sep` before each other."""
    sep: str
    key: Callable[[str], str]
    """A field's name as written before its value."""
    text: Callable[[str], str]
    """A string value as written."""
    bools: tuple[str, str]
    """False and True as written."""
    null: str
    """A missing value as written."""
    quote: str
    """Around an end's ``cid:port``, which needs no escape in either."""
    end: str
    """After the last field."""


def _csv_field(value: object) -> str:
    """``value`` as ``csv.writer`` writes it as a field of a row of several."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(["", value])
    return out.getvalue()[1:-1]


JSON = _Style("{", ", ", lambda k: json.dumps(k) + ": ", json.dumps, ("false", "true"), "null",
              '"', "}")
CSV = _Style("", ",", lambda k: "", _csv_field, (_csv_field(False), _csv_field(True)), "", "",
             "")


def record_rows(table: ConnTable, rows: np.ndarray, style: _Style = JSON) -> Rows:
    """The records of ``rows`` in ``style``, a line each, as UTF-8 (:class:`Rows`, made
    when written): equal to ``json.dumps(record)`` (or to ``csv.writer``'s row), but made by
    the compiled row formatter (``decode._render``) from the table's arrays, as a capture
    can hold a million connections."""
    cols = table.record_columns()
    items: list[tuple[Any, ...]] = []
    lit = ""
    for i, f in enumerate(RECORD_FIELDS):
        lit += (style.sep if i else style.start) + style.key(f.name)
        for item in _items(cols[f.name], f.kind, rows, style):
            if item[0] == _render.K_LIT:
                lit += item[1].decode()
                continue
            items += [(_render.K_LIT, lit.encode()), item]
            lit = ""
    items.append((_render.K_LIT, (lit + style.end).encode()))
    return Rows(len(rows), np.zeros(len(rows), dtype=np.int8), [items])


def _items(col: RecordColumn, kind: type, rows: np.ndarray, style: _Style
           ) -> list[tuple[Any, ...]]:
    """The template items of one record field (of ``kind``, as :data:`RECORD_FIELDS` says)
    at ``rows`` (see ``_render.c``)."""
    values = col.values[rows]
    if col.port is not None:
        quote = (_render.K_LIT, style.quote.encode())
        return [quote, (_render.K_UINT, values.astype(np.uint64)), (_render.K_LIT, b":"),
                (_render.K_UINT, col.port[rows].astype(np.uint64)), quote]
    absent = () if col.missing is None else (col.missing[rows], style.null.encode())
    if kind is str or kind is bool:
        texts = col.texts if kind is str else style.bools
        encoded = tuple((style.text(t) if kind is str else t).encode() for t in texts or ())
        return [(_render.K_STR, values.astype(np.int32), encoded, *absent)]
    if kind is float:
        return [(_render.K_FLOAT, values.astype(np.float64), *absent)]
    if values.dtype.kind == "u":  # CIDs are 64-bit
        return [(_render.K_UINT, values.astype(np.uint64), *absent)]
    return [(_render.K_INT, values.astype(np.int64), 0, *absent)]


TABLE_HEADERS = ("stream", "type", "client", "server", "start", "duration", "handshake",
                 "pkts c→s/s→c", "bytes c→s/s→c", "msgs", "close", "stalls", "violations",
                 "diagnosis")


def table_rows(analysis: Analysis, table: ConnTable, rows: np.ndarray,
               diagnosis: Mapping[int, str] | None = None) -> list[tuple[object, ...]]:
    """Human rows of ``table``'s ``rows``: times relative to the capture's first frame,
    guessed clients marked '?'; ``diagnosis`` is the diagnose column, by stream."""
    diagnosis = diagnosis or {}
    t0 = (analysis.first_ts_ns or 0) / 1e9
    out: list[tuple[object, ...]] = []
    for r in table.records(rows.tolist()):
        msgs = "" if r["messages_c2s"] is None else f"{r['messages_c2s']}/{r['messages_s2c']}"
        hs = "" if r["handshake_ms"] is None else f"{r['handshake_ms']:.3f}ms"
        out.append((
            r["stream"], r["type"], r["client"] + ("" if r["start_seen"] else "?"), r["server"],
            f"+{r['start'] - t0:.6f}", f"{r['duration']:.6f}", hs,
            f"{r['packets_c2s']}/{r['packets_s2c']}", f"{r['bytes_c2s']}/{r['bytes_s2c']}",
            msgs, r["close"], _stalls(r), r["violations"] or "",
            diagnosis.get(r["stream"], "")))
    return out


def _stalls(r: dict[str, Any]) -> str:
    if not r["credit_stalls"]:
        return ""
    return f"{r['credit_stalls']} ({r['stall_time'] * 1e3:.3f}ms)"


class _CidType(click.ParamType):
    """A CID option: a number or a reserved CID's name (``host``), one line if neither."""

    name = "CID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        try:
            return parse_cid(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


_CID = _CidType()


def _check_sort(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if value.lstrip("-") not in FIELD_NAMES:
        raise click.BadParameter(f"unknown field {value!r}; one of: {', '.join(FIELD_NAMES)}")
    return value


@click.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one object per connection (every field).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row (every field).")
@click.option("--sort", "sort_by", default="stream", show_default=True, callback=_check_sort,
              metavar="FIELD", help="Sort by a record field; '-FIELD' sorts descending "
                                    "(e.g. --sort=-bytes).")
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Print at most N connections.")
@click.option("--cid", "cids", type=_CID, multiple=True, help="Only connections with this CID "
              "at either end (repeatable): a number, or host, local, hypervisor, any.")
@click.option("--port", "ports", type=int, multiple=True,
              help="Only connections with this port at either end (repeatable).")
@click.option("--type", "sock_type", type=click.Choice(["stream", "seqpacket"],
                                                        case_sensitive=False),
              help="Only this socket type.")
@click.option("--close", "closes", type=click.Choice([c.value for c in CLOSES]), multiple=True,
              help="Only connections that ended this way (repeatable).")
@click.option("--stream", "streams", type=int, multiple=True, help="Only this stream "
              "(repeatable).")
def conns(file: str, as_json: bool, as_csv: bool, sort_by: str, limit: int | None,
          cids: tuple[int, ...], ports: tuple[int, ...], sock_type: str | None,
          closes: tuple[str, ...], streams: tuple[int, ...]) -> None:
    """List the connections of a capture: ends, bytes, close, credit stalls, violations.

    The client is the end that sent the REQUEST; a '?' marks a connection whose start was
    not captured (roles guessed by port). Streams are numbered like the Wireshark plugin's.

    \b
    Examples:
      vsockmon conns capture.pcap
      vsockmon conns capture.pcap --close refused --close reset-by-server
      vsockmon conns capture.pcap --sort=-bytes -n 10
      vsockmon conns capture.pcap --cid 3 --port 1024 --json | jq .credit_stalls
      vsockmon conns capture.pcap --csv > conns.csv
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    with opened(file) as cap:
        # the table's diagnosis column costs a diagnose pass; JSON and CSV leave it out
        diagnosis = {} if as_json or as_csv else stream_summary(cap.findings())
        analysis = cap.analysis()
    picked = _picked(analysis, sort_by, limit, cids, ports, sock_type, closes, streams)
    if as_json or as_csv:
        out = sys.stdout.buffer
        if as_csv:
            out.write(",".join(map(_csv_field, FIELD_NAMES)).encode() + b"\n")
        # the next range's records are gathered while the writer formats this one's
        with BackgroundWriter(out) as writer:
            for table, rows in picked:
                writer.put(record_rows(table, rows, JSON if as_json else CSV))
    else:
        from tabulate import tabulate

        lines = [line for table, rows in picked
                 for line in table_rows(analysis, table, rows, diagnosis)]
        click.echo(tabulate(lines, headers=TABLE_HEADERS, disable_numparse=True))
        click.echo(f"{len(lines)} of {len(analysis.tracker)} connections; "
                   f"{analysis.frames} frames"
                   + (f", {analysis.frames_without_stream} without a virtio header"
                      if analysis.frames_without_stream else ""))
    sys.stdout.flush()


def _picked(analysis: Analysis, sort_by: str, limit: int | None, *filters: Any
            ) -> Iterator[tuple[ConnTable, np.ndarray]]:
    """The connections to print, in order, as (table, rows) pieces of at most
    :data:`CHUNK` rows: in stream order a range of streams at a time, and the first
    ``limit`` in another order from each range's own first ``limit``, so that memory stays
    bounded however many connections the capture holds; every connection in another order
    from the whole table (it must all be held to be sorted)."""
    left = limit
    if sort_by == "stream":
        pieces: Iterator[tuple[ConnTable, np.ndarray]] = (
            (t, matching(t, *filters)) for t in analysis.tables())
    else:
        if limit is not None:  # a row of the first ``limit`` is one of its range's
            best = [t.take(np.sort(order(t, matching(t, *filters), sort_by)[:limit]))
                    for t in analysis.tables()]
            table = ConnTable.concat(best) if best else analysis.table
            rows = order(table, np.arange(len(table)), sort_by)
        else:
            table = analysis.table
            rows = order(table, matching(table, *filters), sort_by)
        pieces = ((table, rows[a : a + CHUNK]) for a in range(0, len(rows), CHUNK))
    for table, rows in pieces:
        if left is not None:
            rows = rows[:left]
            left -= len(rows)
        yield table, rows
        if left == 0:
            return
