"""``vsockmon fleet``: conns, diagnose, stats and export over many captures on a Dask cluster.

A shell over :mod:`vsockmon.fleet`: options, a progress bar, and the output. Every capture
is one task; results come back as they finish and are printed in the captures' order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vsockmon.fleet import (
    CONNECT_TIMEOUT,
    HOST_FROM_DEFAULT,
    HOST_FROM_NAMED,
    MAX_LOCAL_WORKERS,
    Capture,
    CaptureResult,
    FleetError,
    Outcome,
    Request,
    connect,
    expand,
    run,
)

if TYPE_CHECKING:
    from vsockmon.fleet.dataset import Dataset

EXIT_FAILED = 1
"""conns, stats, export: some capture could not be analysed (the others were)."""
EXIT_FINDINGS = 1
"""diagnose: a finding at warning or above (as ``vsockmon diagnose``)."""
EXIT_ERROR = 2
"""diagnose: some capture could not be analysed (as ``vsockmon diagnose``)."""
TABLE_FORMATS = ("parquet", "csv", "json")

Common = dict[str, Any]
"""The options every fleet command shares (sources, cluster, hosts)."""


class FleetFailure(click.ClickException):
    """One line on stderr, exit status 1 (conns, stats, export)."""

    exit_code = EXIT_FAILED


class DiagnoseFailure(FleetFailure):
    """One line on stderr, exit status 2 (diagnose, as ``vsockmon diagnose``)."""

    exit_code = EXIT_ERROR


def _common(command: Callable[..., None]) -> Callable[..., None]:
    """SOURCES and the cluster and host options, shared by every fleet command."""
    host_help = "; ".join(f"'{k}': {v}" for k, v in HOST_FROM_NAMED.items())
    for decorate in reversed((
        click.argument("sources", nargs=-1, required=True, metavar="SOURCES..."),
        click.option("--scheduler", metavar="tcp://HOST:PORT",
                     help="An existing Dask scheduler. Without it a local cluster of one "
                          "process per core is started for the run and stopped after."),
        click.option("--workers", type=click.IntRange(min=1, max=MAX_LOCAL_WORKERS),
                     help="Processes of the local cluster (default: one per core)."),
        click.option("--connect-timeout", type=click.FloatRange(min=0.1),
                     default=CONNECT_TIMEOUT, show_default=True, metavar="SECONDS",
                     help="How long to try reaching --scheduler."),
        click.option("--host-from", default=HOST_FROM_DEFAULT, show_default=True,
                     metavar="RULE", help=f"Where a capture's host comes from: {host_help}; "
                     "or a regular expression searched in the path (its group 'host', else "
                     "its first group, else the match)."),
    )):
        command = decorate(command)
    return command


@click.group()
def fleet() -> None:
    """Many captures from many hosts, one task each on a Dask cluster.

    SOURCES are directories (every .pcap, .pcapng, .pcap.gz, … under them), quoted globs
    or capture files, on this machine or at fsspec URLs the workers can read. A capture
    that cannot be read is reported with its path and reason; the others go on, and the
    exit status says so. See docs/fleet.md.

    \b
    Examples:
      vsockmon fleet diagnose captures/
      vsockmon fleet conns 'captures/*/*.pcap.gz' -o conns/
      vsockmon fleet export captures/ -o tables/ --scheduler tcp://dask:8786
      vsockmon fleet stats captures/ --host-from name --json
    """


def _captures(common: Common) -> list[Capture]:
    if common["scheduler"] and common["workers"]:
        raise click.UsageError("--workers is for the local cluster; an existing one (at "
                               "--scheduler) has the workers it has")
    try:
        return expand(common["sources"], common["host_from"])
    except FleetError as e:
        raise common["failure"](str(e)) from None


@contextmanager
def _progress(total: int) -> Iterator[Callable[[Outcome], None]]:
    """A callback counting finished captures on a rich bar (stderr, terminals only)."""
    if not sys.stderr.isatty():
        yield lambda _outcome: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("captures", BarColumn(), MofNCompleteColumn(), "{task.fields[failed]} failed",
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fleet", total=total, failed=0)
        failed = 0

        def advance(outcome: Outcome) -> None:
            nonlocal failed
            failed += outcome.error is not None
            bar.update(task, advance=1, failed=failed)

        yield advance


def _run(common: Common, captures: list[Capture], request: Request,
         on_result: Callable[[Capture, CaptureResult], None] | None = None) -> list[Outcome]:
    """Run every capture on the cluster; the outcomes in the captures' order, after saying
    on stderr which captures failed and which were read only in part."""
    outcomes: list[Outcome] = []
    try:
        with connect(common["scheduler"], common["workers"], common["connect_timeout"]) \
                as client, _progress(len(captures)) as advance:
            for outcome in run(client, captures, request, on_done=advance):
                if outcome.result is not None and on_result is not None:
                    on_result(outcome.capture, outcome.result)
                outcomes.append(outcome)
    except FleetError as e:
        raise common["failure"](str(e)) from None
    order = {c: i for i, c in enumerate(captures)}
    outcomes.sort(key=lambda o: order[o.capture])
    for o in outcomes:
        if o.error is not None:
            click.echo(f"vsockmon: {o.error}", err=True)
        elif o.result is not None and o.result.warning:
            click.echo(f"vsockmon: warning: {o.capture.source}: {o.result.warning}; "
                       "analysed the packets before it", err=True)
    return outcomes


def _check_failures(common: Common, outcomes: list[Outcome]) -> None:
    failed = sum(o.error is not None for o in outcomes)
    if failed:
        raise common["failure"](f"{failed} of {len(outcomes)} captures failed")


def _dataset(out: str, table: str, fmt: str, captures: list[Capture], force: bool,
             common: Common) -> Dataset:
    from vsockmon.fleet.dataset import Dataset

    try:
        return Dataset(Path(out), table, fmt, captures, force)
    except FleetError as e:
        raise common["failure"](str(e)) from None


def _writer(*sinks: tuple[Dataset, str]) -> Callable[[Capture, CaptureResult], None]:
    """Write each result's tables into their datasets as the results arrive."""

    def write(capture: Capture, result: CaptureResult) -> None:
        for dataset, table in sinks:
            try:
                dataset.write(capture, getattr(result, table))
            except FleetError as e:
                raise FleetFailure(str(e)) from None

    return write


def _n(count: int, noun: str) -> str:
    """``1 capture``, ``2 captures``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _print_lines(lines: Iterator[str]) -> None:
    try:
        for line in lines:
            click.echo(line)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stderr.close()


def _wrote(dataset: Dataset, what: str) -> None:
    click.echo(f"wrote {dataset.rows} {what} of {_n(dataset.files, 'capture')} to {dataset.out}/ "
               f"(host=…/capture=…/{dataset.file_name})", err=True)


# -- conns ---------------------------------------------------------------------------------


@fleet.command()
@_common
@click.option("-o", "--output", metavar="OUT", help="Write the connections as a dataset: "
              "OUT/host=…/capture=…/connections.parquet.")
@click.option("--format", "fmt", type=click.Choice(TABLE_FORMATS), default="parquet",
              show_default=True, help="Format of the -o dataset's files.")
@click.option("--force", is_flag=True, help="Replace the dataset files this run writes.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per connection, "
              "the fields of 'vsockmon conns --json' after host and capture.")
def conns(output: str | None, fmt: str, force: bool, as_json: bool, **common: Any) -> None:
    """Every connection of every capture, with its host and capture.

    Exit status: 0, or 1 when some capture could not be analysed.

    \b
    Examples:
      vsockmon fleet conns captures/
      vsockmon fleet conns captures/ -o conns/
      duckdb -c "select host, count(*) from read_parquet('conns/**/*.parquet',
                 hive_partitioning=true) where close = 'refused' group by 1"
      vsockmon fleet conns 's3://bucket/captures/*/*.pcap' --json --scheduler tcp://dask:8786
    """
    if output and as_json:
        raise click.UsageError("choose one of -o (a dataset) and --json (JSON Lines on stdout)")
    common["failure"] = FleetFailure
    captures = _captures(common)
    request = Request(frozenset({"connections"}))
    if output:
        dataset = _dataset(output, "connections", fmt, captures, force, common)
        outcomes = _run(common, captures, request, _writer((dataset, "connections")))
        _wrote(dataset, "connections")
    else:
        outcomes = _run(common, captures, request)
        done = [(o.capture, o.result.connections) for o in outcomes
                if o.result is not None and o.result.connections is not None]
        _print_lines(_conns_json(done) if as_json else _conns_text(done, len(outcomes)))
    _check_failures(common, outcomes)


def _conn_records(done: list[tuple[Capture, Any]]) -> Iterator[dict[str, Any]]:
    for capture, table in done:
        for row in table.to_pylist():
            row.pop("capture", None)
            yield {"host": capture.host, "capture": capture.name, **row}


def _conns_json(done: list[tuple[Capture, Any]]) -> Iterator[str]:
    for record in _conn_records(done):
        yield json.dumps(record, ensure_ascii=False)


def _conns_text(done: list[tuple[Capture, Any]], total: int) -> Iterator[str]:
    from tabulate import tabulate

    rows = [(r["host"], r["capture"], r["stream"], r["type"],
             r["client"] + ("" if r["start_seen"] else "?"), r["server"],
             f"{r['bytes_c2s']}/{r['bytes_s2c']}", r["close"],
             r["credit_stalls"] or "", r["violations"] or "") for r in _conn_records(done)]
    yield tabulate(rows, headers=("host", "capture", "stream", "type", "client", "server",
                                  "bytes c→s/s→c", "close", "stalls", "violations"),
                   disable_numparse=True)
    hosts = len({c.host for c, _ in done})
    yield (f"{_n(len(rows), 'connection')} in {len(done)} of {_n(total, 'capture')} on "
           f"{_n(hosts, 'host')}")


# -- diagnose ------------------------------------------------------------------------------


def _rule_ids() -> list[str]:
    from vsockmon.diagnose.engine import RULES

    return [i for r in RULES.values() for i in (r.id, *(f"{r.id}/{k}" for k in r.kinds))]


@fleet.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per finding, "
              "'vsockmon diagnose --json' with host, capture and source first.")
@click.option("--rule", "rules", multiple=True, type=click.Choice(_rule_ids()),
              metavar="RULE", help="Only this rule (or rule/kind); repeatable.")
@click.option("--min-severity", type=click.Choice(["info", "warning", "error"]),
              default="info", show_default=True, help="Leave out findings below this.")
@click.option("--examples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Captures shown for each rule: where it fires most.")
def diagnose(as_json: bool, rules: tuple[str, ...], min_severity: str, examples: int,
             **common: Any) -> None:
    """What went wrong across the fleet: each rule with how many captures and hosts it
    fires on, and the captures where it fires most.

    The findings of each capture are exactly those of 'vsockmon diagnose FILE' (default
    thresholds). Exit status: 0 when nothing at warning or above is found, 1 when
    something is, 2 when some capture could not be analysed.

    \b
    Examples:
      vsockmon fleet diagnose captures/
      vsockmon fleet diagnose captures/ --min-severity warning --scheduler tcp://dask:8786
      vsockmon fleet diagnose captures/ --json | jq -r '.host + " " + .rule' | sort | uniq -c
      vsockmon fleet diagnose captures/ --rule no-listener --host-from 'hosts/([^/]+)/'
    """
    from vsockmon.fleet.findings import group, tagged

    common["failure"] = DiagnoseFailure
    captures = _captures(common)
    outcomes = _run(common, captures,
                    Request(frozenset({"findings"}), tuple(rules), min_severity))
    done = [(o.capture, o.result.findings) for o in outcomes
            if o.result is not None and o.result.findings is not None]
    if as_json:
        _print_lines(json.dumps(tagged(c, f), ensure_ascii=False) for c, fs in done for f in fs)
    else:
        _print_lines(_diagnose_text(group(done), len(done), examples))
    _check_failures(common, outcomes)
    if any(f["severity"] in ("warning", "error") for _, fs in done for f in fs):
        sys.exit(EXIT_FINDINGS)


_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def _diagnose_text(groups: list[Any], analysed: int, examples: int) -> Iterator[str]:
    if not groups:
        yield f"no findings in {_n(analysed, 'capture')}."
        return
    for g in groups:
        sev = str(g.severity)
        yield (click.style(sev.upper(), fg=_STYLE[sev], bold=True)
               + click.style(f" {g.rule}", bold=True)
               + f"  {_n(g.findings, 'finding')} in {len(g.captures)} of "
                 f"{_n(analysed, 'capture')} on {_n(g.hosts, 'host')}")
        for capture, found in g.examples(examples):
            first = found[0]
            where = "" if first["stream"] is None else f"stream {first['stream']}: "
            yield f"  {capture.host}  {capture.name}  ×{len(found)}  {where}{first['message']}"
        more = len(g.captures) - examples
        if more > 0:
            yield f"  … and {_n(more, 'more capture')}"
        yield ""
    yield f"{_n(len(groups), 'rule')} fired in {_n(analysed, 'capture')}."


# -- stats ---------------------------------------------------------------------------------


@fleet.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per capture, "
              "'vsockmon stats --json' after host, capture and source.")
def stats(as_json: bool, **common: Any) -> None:
    """What each capture holds (frames, connections, bytes, closes), and the fleet's totals.

    Exit status: 0, or 1 when some capture could not be analysed.

    \b
    Examples:
      vsockmon fleet stats captures/
      vsockmon fleet stats captures/ --json | jq -c '{host, capture, closes}'
    """
    common["failure"] = FleetFailure
    captures = _captures(common)
    outcomes = _run(common, captures, Request(frozenset({"stats"})))
    done = [(o.capture, o.result.stats) for o in outcomes
            if o.result is not None and o.result.stats is not None]
    if as_json:
        _print_lines(json.dumps({"host": c.host, "capture": c.name, "source": c.source, **s})
                     for c, s in done)
    else:
        _print_lines(_stats_text(done))
    _check_failures(common, outcomes)


def _closes(closes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(closes.items(), key=lambda kv: -kv[1]))


def _stats_text(done: list[tuple[Capture, dict[str, Any]]]) -> Iterator[str]:
    from collections import Counter

    from tabulate import tabulate

    rows = [(c.host, c.name, s["frames"], s["connections"], f"{s['duration']:.3f}",
             s["payload_bytes"], sum(s["anomalies"].values()), _closes(s["closes"]))
            for c, s in done]
    yield tabulate(rows, headers=("host", "capture", "frames", "conns", "seconds",
                                  "payload bytes", "anomalies", "closes"),
                   disable_numparse=True)
    closes: Counter[str] = Counter()
    for _, s in done:
        closes.update(s["closes"])
    yield (f"total: {_n(len(done), 'capture')} on {_n(len({c.host for c, _ in done}), 'host')}, "
           f"{sum(s['frames'] for _, s in done)} frames, "
           f"{sum(s['connections'] for _, s in done)} connections, "
           f"{sum(s['payload_bytes'] for _, s in done)} payload bytes"
           + (f"; closes: {_closes(closes)}" if closes else ""))


# -- export --------------------------------------------------------------------------------


@fleet.command()
@_common
@click.option("-o", "--output", required=True, metavar="OUT",
              help="The directory of the two datasets: OUT/packets/ and OUT/connections/.")
@click.option("--format", "fmt", type=click.Choice(TABLE_FORMATS), default="parquet",
              show_default=True, help="Format of the datasets' files.")
@click.option("--force", is_flag=True, help="Replace the dataset files this run writes.")
def export(output: str, fmt: str, force: bool, **common: Any) -> None:
    """The packets and connections tables of every capture, as two Hive-partitioned
    datasets: OUT/packets/host=…/capture=…/packets.parquet and the same for connections.
    Columns as 'vsockmon export' (docs/export.md), host and capture from the directories.

    Exit status: 0, or 1 when some capture could not be analysed.

    \b
    Examples:
      vsockmon fleet export captures/ -o tables/
      duckdb -c "select host, op_name, count(*) from read_parquet('tables/packets/**/*.parquet',
                 hive_partitioning=true) group by all"
    """
    common["failure"] = FleetFailure
    captures = _captures(common)
    packets = _dataset(str(Path(output) / "packets"), "packets", fmt, captures, force, common)
    conns_ = _dataset(str(Path(output) / "connections"), "connections", fmt, captures, force,
                      common)
    outcomes = _run(common, captures, Request(frozenset({"packets", "connections"})),
                    _writer((packets, "packets"), (conns_, "connections")))
    _wrote(packets, "packets")
    _wrote(conns_, "connections")
    _check_failures(common, outcomes)
