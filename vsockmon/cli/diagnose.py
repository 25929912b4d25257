"""``vsockmon diagnose``: what went wrong in a capture, why, and how to fix it."""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from dataclasses import fields
from typing import Any

import click

from vsockmon.analysis.pipeline import Analysis
from vsockmon.cli.reading import opened
from vsockmon.diagnose.engine import RULES, LiveDiagnosis
from vsockmon.diagnose.model import Finding, Numbers, Severity, Thresholds
from vsockmon.diagnose.views import matching_findings

EXIT_FINDINGS = 1
"""Exit status when a finding at WARNING or above is reported (a capture that cannot be read
gives 2: :data:`vsockmon.cli.ERROR_EXIT`)."""

_STYLE = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def _option_name(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def _threshold_options(command: Any) -> Any:
    """One option per :class:`Thresholds` field, with its unit and doc as help."""
    for f in reversed(fields(Thresholds)):
        unit = f.metadata["unit"]
        command = click.option(
            _option_name(f.name), f.name, type=float if unit == "s" else int,
            default=f.default, show_default=True,
            metavar="SECONDS" if unit == "s" else unit.upper(),
            help=f.metadata["doc"] + ".")(command)
    return command


def _rule_ids() -> list[str]:
    ids = []
    for rule in RULES.values():
        ids.append(rule.id)
        ids += [f"{rule.id}/{kind}" for kind in rule.kinds]
    return ids


@click.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one finding per line (rule, kind, severity, stream, streams, "
                   "frames, time_ns, t, connection, message, cause, fix, evidence).")
@click.option("--rule", "rules", multiple=True, type=click.Choice(_rule_ids()),
              metavar="RULE", help="Only this rule (or rule/kind); repeatable. "
              "Rules: " + ", ".join(RULES) + ".")
@click.option("--min-severity", type=click.Choice([str(s) for s in Severity]), default="info",
              show_default=True, help="Leave out findings below this severity.")
@_threshold_options
def diagnose(file: str, as_json: bool, rules: tuple[str, ...], min_severity: str,
             **limits: Any) -> None:
    """Find what went wrong in a capture, explain it and say how to fix it.

    Findings are grouped by connection (stream), the most severe first, each with the
    frames that show it, the numbers that matter, its likely cause and the fix. Exit
    status: 0 when nothing at warning or above is reported, 1 when something is, 2 when the
    capture cannot be read — usable in CI scripts. See docs/diagnose.md for every rule.

    \b
    Examples:
      vsockmon diagnose capture.pcap
      vsockmon diagnose capture.pcap --min-severity warning
      vsockmon diagnose capture.pcap --json | jq -r '.rule + " " + .message'
      vsockmon diagnose capture.pcap --rule no-listener --rule window-full
      vsockmon diagnose capture.pcap --stall 5 --half-close 10
    """
    with opened(file) as cap:
        found = cap.findings(Thresholds(**limits))
        analysis = cap.analysis()
    shown = matching_findings(found, rules, Severity.parse(min_severity))
    if as_json:
        for f in shown:  # in pieces: a storm's one finding names millions of frames
            for piece in f.json_pieces(analysis.start_ns):
                click.echo(piece, nl=False)
            click.echo()
    else:
        _print_report(analysis, shown, hidden=len(found) - len(shown))
    if any(f.severity >= Severity.WARNING for f in shown):
        sys.exit(EXIT_FINDINGS)


def _print_report(analysis: Analysis, shown: list[Finding], hidden: int) -> None:
    start = analysis.start_ns
    span = ((analysis.end_ns or 0) - (start or 0)) / 1e9
    connections = len(analysis.tracker)  # counted, not made: a storm holds a million
    click.echo(f"{analysis.name}: {analysis.frames} frames, {connections} connections, "
               f"{span:.3f} s")
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    groups: dict[int | None, list[Finding]] = {}
    for f in shown:  # ranked already: the first group is the most severe
        groups.setdefault(f.stream, []).append(f)
    for stream, group in groups.items():
        click.echo()
        head = "capture" if stream is None else f"stream {stream}  {group[0].connection}"
        click.secho(head, bold=True)
        for f in group:
            _print_finding(f, start, width)
    click.echo()
    click.echo(_verdict(shown, connections, hidden))


def _print_finding(f: Finding, start: int | None, width: int) -> None:
    when = f"at {(f.time_ns - start) / 1e9:.6f} s, " if f.time_ns is not None and start else ""
    streams = f.streams.array()
    others = Numbers(streams[streams != f.stream])
    click.echo("  " + click.style(str(f.severity).upper(), fg=_STYLE[f.severity], bold=True)
               + f" {f.rule_id}  ({when}frames ", nl=False)
    for piece in f.frames.pieces():  # in pieces: a storm's finding names millions
        click.echo(piece, nl=False)
    if others:
        click.echo("; also stream ", nl=False)
        for piece in others.pieces():
            click.echo(piece, nl=False)
    click.echo(")")
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ")
    click.echo(wrap.fill(f.message))
    for title, text in (("cause", f.cause), ("fix", f.fix)):
        wrap = textwrap.TextWrapper(width=width, initial_indent=f"    {title}: ",
                                    subsequent_indent="    " + " " * (len(title) + 2))
        click.echo(wrap.fill(text))


def _verdict(shown: list[Finding], connections: int, hidden: int) -> str:
    counts = {s: sum(f.severity == s for f in shown) for s in Severity}
    notes = f"; {counts[Severity.INFO]} note(s)" if counts[Severity.INFO] else ""
    left_out = f"; {hidden} finding(s) left out by the filters" if hidden else ""
    if not counts[Severity.ERROR] and not counts[Severity.WARNING]:
        return f"verdict: no problems found in {connections} connection(s){notes}{left_out}."
    parts = [f"{counts[s]} {s}(s)" for s in (Severity.ERROR, Severity.WARNING) if counts[s]]
    return f"verdict: {', '.join(parts)}{notes}{left_out}."


class LiveReport:
    """``capture --diagnose``: wraps the capture's sink, feeds every batch it writes to a
    :class:`LiveDiagnosis` and prints each finding on stderr once it is certain; what only
    the capture's end can tell comes at :meth:`close`. Frame numbers are those of the
    written file (of its first file when a ring rotates)."""

    def __init__(self, sink: Any, thresholds: Thresholds | None = None) -> None:
        self.sink = sink
        self.live = LiveDiagnosis(thresholds)
        self.reported: list[Finding] = []

    def write(self, batch: Any) -> None:
        self.sink.write(batch)
        self.live.feed_frames(batch)
        self.tick()

    def tick(self) -> None:
        self._print(self.live.update(time.time_ns()))

    def close(self) -> None:
        try:
            self.sink.close()
        finally:  # the capture's end: the one a pcapng file records, if it does
            stopped = getattr(self.sink, "end_ns", None) or time.time_ns()
            self._print(self.live.close(stopped))
            recorded = getattr(self.sink, "records_end", None)
            if recorded is not None:  # a file is written (not the live line view)
                self._explain_file(stopped, recorded)
            counts = {s: sum(f.severity == s for f in self.reported) for s in Severity}
            click.echo(f"diagnose: {counts[Severity.ERROR]} error(s), "
                       f"{counts[Severity.WARNING]} warning(s), {counts[Severity.INFO]} "
                       f"note(s)", err=True)

    def _explain_file(self, stopped_ns: int, recorded: bool) -> None:
        """Say which findings ``vsockmon diagnose FILE`` will report differently, and why: a
        pcap file cannot record the silence between its last frame and the capture's stop
        (a pcapng file records the stop: then the two agree)."""
        missing, extra = self.live.file_differences(self.reported,
                                                    stopped_ns if recorded else None)
        replaced = self.live.replaced(missing, stopped_ns)
        for f in replaced:
            click.echo(f"diagnose: {_headline(f)} was replaced as the connection went on: "
                       f"the file reports what it became", err=True)
        missing = [f for f in missing if f not in replaced]
        if not missing and not extra:
            return
        last = self.live.digest.end_ns
        if recorded or last is None:
            why = "'vsockmon diagnose FILE' will report differently:"
        else:
            why = (f"the written file ends at its last frame (frame {self.live.last_frame}, "
                   f"{(stopped_ns - last) / 1e9:.1f} s before the capture stopped; a pcap "
                   f"file cannot record the stop, write .pcapng for that); 'vsockmon "
                   f"diagnose FILE' measures silences up to there only, so its report "
                   f"differs:")
        click.echo(f"diagnose: {why}", err=True)
        for title, group in (("not in the file's report", missing),
                             ("only in the file's report", extra)):
            for f in group:
                click.echo(f"diagnose:   {title}: {_headline(f)}", err=True)

    def _print(self, findings: list[Finding]) -> None:
        for f in findings:
            self.reported.append(f)
            click.echo(f"diagnose: {_headline(f)}: {f.message} Fix: {f.fix}", err=True)


def _headline(f: Finding) -> str:
    """``SEVERITY rule (stream N, frames a,b)``: how a live report names a finding."""
    where = f"stream {f.stream}, " if f.stream is not None else ""
    frames = f.frames.text(",")
    return f"{str(f.severity).upper()} {f.rule_id} ({where}frames {frames})"

