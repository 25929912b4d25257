"""``vsockmon conns``: one line (or JSON object, or CSV row) per connection of a capture."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import click
import numpy as np

from vsockmon.analysis.pipeline import Analysis
from vsockmon.cli.reading import opened
from vsockmon.conntrack.query import matching, order
from vsockmon.conntrack.tracker import CLOSES, RECORD_FIELDS, ConnTable
from vsockmon.diagnose.views import stream_summary
from vsockmon.wire.protocol import parse_cid

FIELD_NAMES = [f.name for f in RECORD_FIELDS]
CHUNK = 20000
"""Connections formatted at a time: output memory stays bounded."""
_KINDS = {f.name: f.kind for f in RECORD_FIELDS}


def json_lines(table: ConnTable, rows: np.ndarray) -> list[str]:
    """The JSON texts of ``rows``' records, equal to ``json.dumps(record)`` but made column
    by column: a capture can hold a million connections. Numeric columns go straight into
    one ``%`` template; the others are encoded first."""
    cols = table.columns()
    parts, values = [], []
    for name in FIELD_NAMES:
        col, kind = cols[name], _KINDS[name]
        if isinstance(col, np.ndarray) and kind in (int, float):
            parts.append(f"{json.dumps(name)}: {'%d' if kind is int else '%r'}")
            values.append(col[rows].tolist())
        else:
            parts.append(f"{json.dumps(name)}: %s")
            values.append(_encode(col, rows, kind))
    template = "{" + ", ".join(parts) + "}"
    return [template % row for row in zip(*values, strict=True)]


def _encode(col: np.ndarray | list, rows: np.ndarray, kind: type) -> list[str]:
    """JSON texts of one column's values at ``rows``: a numpy column of booleans, or a list
    (strings, or numbers with None for missing values)."""
    if isinstance(col, np.ndarray):
        return np.where(col[rows], "true", "false").tolist()
    picked = [col[i] for i in rows.tolist()]
    if kind is str:
        seen: dict[str, str] = {}
        return ["null" if v is None else seen.get(v) or seen.setdefault(v, json.dumps(v))
                for v in picked]
    return ["null" if v is None else repr(v) for v in picked]


TABLE_HEADERS = ("stream", "type", "client", "server", "start", "duration", "handshake",
                 "pkts c→s/s→c", "bytes c→s/s→c", "msgs", "close", "stalls", "violations",
                 "diagnosis")


def table_rows(analysis: Analysis, rows: np.ndarray,
               diagnosis: Mapping[int, str] | None = None) -> list[tuple[object, ...]]:
    """Human rows: times relative to the capture's first frame, guessed clients marked '?';
    ``diagnosis`` is the diagnose column, by stream."""
    diagnosis = diagnosis or {}
    t0 = (analysis.first_ts_ns or 0) / 1e9
    out: list[tuple[object, ...]] = []
    for r in analysis.table.records(rows.tolist()):
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
    picked = _picked(analysis, not (as_json or as_csv), sort_by, limit, cids, ports,
                     sock_type, closes, streams)
    if as_json:
        for table, rows in picked:
            sys.stdout.write("".join(line + "\n" for line in json_lines(table, rows)))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(FIELD_NAMES)
        for table, rows in picked:
            for rec in table.records(rows.tolist()):
                writer.writerow(["" if v is None else v for v in rec.values()])
    else:
        from tabulate import tabulate

        table = analysis.table
        rows = np.concatenate([np.zeros(0, dtype=np.int64), *(r for _, r in picked)])
        click.echo(tabulate(table_rows(analysis, rows, diagnosis), headers=TABLE_HEADERS,
                            disable_numparse=True))
        click.echo(f"{len(rows)} of {len(table)} connections; {analysis.frames} frames"
                   + (f", {analysis.frames_without_stream} without a virtio header"
                      if analysis.frames_without_stream else ""))
    sys.stdout.flush()


def _picked(analysis: Analysis, whole: bool, sort_by: str, limit: int | None, *filters: Any
            ) -> Iterator[tuple[ConnTable, np.ndarray]]:
    """The connections to print, in order, as (table, rows) pieces of at most
    :data:`CHUNK` rows: in stream order a range of streams at a time, so that memory
    stays bounded however many connections the capture holds; in another order, or
    ``whole``, from the whole table (it must all be held to be sorted)."""
    left = limit
    if sort_by == "stream" and not whole:
        pieces: Iterator[tuple[ConnTable, np.ndarray]] = (
            (t, matching(t, *filters)) for t in analysis.tables())
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
