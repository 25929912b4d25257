"""Findings arranged for the outputs: by stream, by frame, as one-line notes and markers.

What ``conns`` (its diagnosis column), ``timeline`` (markers), ``export`` (pcapng comments)
and ``diagnose`` (its filters) show of a list of findings. No I/O here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from vsockmon.diagnose.model import Finding, Severity, rank


def findings_by_stream(findings: Iterable[Finding]) -> dict[int | None, list[Finding]]:
    """Findings per connection (every stream a finding concerns), ranked; None: capture-wide."""
    out: dict[int | None, list[Finding]] = defaultdict(list)
    for f in findings:
        for s in f.streams or (None,):
            out[s].append(f)
    return {k: rank(v) for k, v in out.items()}


def findings_by_frame(findings: Iterable[Finding]) -> dict[int, list[Finding]]:
    """Findings per evidence frame: for markers, packet comments and expert info."""
    out: dict[int, list[Finding]] = defaultdict(list)
    for f in findings:
        for n in f.frames:
            out[n].append(f)
    return dict(out)


def frame_notes(findings: Iterable[Finding]) -> dict[int, list[str]]:
    """One line per finding at each of its frames — ``ERROR no-listener: <message>`` — for
    timeline markers and packet comments."""
    out: dict[int, list[str]] = defaultdict(list)
    for f in rank(findings):
        for n in f.frames:
            out[n].append(f"{str(f.severity).upper()} {f.rule_id}: {f.message}")
    return dict(out)


def markers(findings: Iterable[Finding], shown: Iterable[int]) -> dict[int, list[str]]:
    """Each finding once, at the last of its frames among ``shown`` (a drawing's frames):
    the line of :func:`frame_notes`, where the pattern has become visible."""
    frames = set(shown)
    out: dict[int, list[str]] = defaultdict(list)
    for f in rank(findings):
        mine = [n for n in f.frames if n in frames]
        if mine:
            out[max(mine)].append(f"{str(f.severity).upper()} {f.rule_id}: {f.message}")
    return dict(out)


def worst_by_stream(findings: Iterable[Finding]) -> dict[int, Finding]:
    """The most severe finding of each connection: for a one-column summary (``conns``)."""
    return {s: fs[0] for s, fs in findings_by_stream(findings).items() if s is not None}


def stream_summary(findings: Iterable[Finding], min_severity: Severity = Severity.WARNING
                   ) -> dict[int, str]:
    """Each connection's most severe finding (at ``min_severity`` and up) as
    ``severity rule`` plus ``+N`` for the N others: the diagnosis column of ``conns``."""
    shown = [f for f in findings if f.severity >= min_severity]
    out = {}
    for stream, found in findings_by_stream(shown).items():
        if stream is not None:
            more = f" +{len(found) - 1}" if len(found) > 1 else ""
            out[stream] = f"{found[0].severity} {found[0].rule_id}{more}"
    return out


def matching_findings(findings: Iterable[Finding], rules: Sequence[str] = (),
           min_severity: Severity = Severity.INFO) -> list[Finding]:
    """Findings of the given rules (``rule`` or ``rule/kind``) at or above a severity."""
    wanted = set(rules)
    return [f for f in findings if f.severity >= min_severity
            and (not wanted or f.rule in wanted or f.rule_id in wanted)]
