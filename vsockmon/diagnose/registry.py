"""The rules registry, and the context every rule reads and reports into.

A rule is data (:class:`~vsockmon.diagnose.model.Rule`: id, severity, title, kinds, check,
``after``), registered by decorating its check with :func:`rule`. The engine runs the checks
in registration order, except that a rule runs after those it names in ``after``: some
rules explain a connection (a CID mismatch explains why a REQUEST went unanswered) and
others leave explained connections alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from vsockmon.conntrack.tracker import Connection, ConnTable
from vsockmon.diagnose.connections import Connections
from vsockmon.diagnose.digest import Digest
from vsockmon.diagnose.model import Finding, Numbers, Rule, Severity, Thresholds, opt_tuple

RULES: dict[str, Rule] = {}
"""Every rule by id, in registration order (filled by importing :mod:`vsockmon.diagnose.rules`)."""

Check = Callable[["Context"], None]


def rule(rule_id: str, severity: Severity, title: str, *, kinds: tuple[str, ...] = (),
         after: tuple[str, ...] = ()) -> Callable[[Check], Check]:
    """Register the decorated function as the check of rule ``rule_id``."""

    def register(check: Check) -> Check:
        if rule_id in RULES:
            raise ValueError(f"rule {rule_id!r} registered twice")
        RULES[rule_id] = Rule(rule_id, severity, title, check, kinds, after)
        return check

    return register


def in_order(rules: dict[str, Rule]) -> list[Rule]:
    """The rules in registration order, each moved after the rules it names in ``after``."""
    done: dict[str, Rule] = {}

    def visit(r: Rule, path: tuple[str, ...]) -> None:
        if r.id in done:
            return
        if r.id in path:
            raise ValueError(f"rules depend on each other in a circle: {' → '.join(path)}")
        for dep in r.after:
            if dep not in rules:
                raise ValueError(f"rule {r.id!r} runs after unknown rule {dep!r}")
            visit(rules[dep], (*path, r.id))
        done[r.id] = r

    for r in rules.values():
        visit(r, ())
    return list(done.values())


def label(conn: Connection) -> str:
    """``client → server TYPE``, the way findings name a connection."""
    return f"{conn.client.addr} → {conn.server.addr} {conn.type_name}"


class Context:
    """What every rule reads (connections, digest, thresholds, the capture's end) and what
    rules tell each other: the connections a finding already explains."""

    def __init__(self, conns: Iterable[Connection] | ConnTable | Connections, digest: Digest,
                 t: Thresholds, end_ns: int, final: bool) -> None:
        self.conns = conns if isinstance(conns, Connections) else Connections.of(conns)
        self.digest = digest
        self.t = t
        self.end_ns = end_ns
        self.final = final
        """False for a live capture: leave out what only the capture's end can tell."""
        self.findings: list[Finding] = []
        self.rule: Rule | None = None
        """The rule whose check is running: :meth:`add` reports for it."""
        self.open_end_explained: set[int] = set()
        """Streams whose missing end a finding already explains (no mid-capture for them)."""
        self.unestablished: set[int] = set()
        """Streams whose failure a finding already explains (no refusal or reset for them)."""
        self.queue_refused: set[int] = set()
        """Streams refused by a full accept queue: parallel clients, not a retry loop."""
        self.reset_explained: set[int] = set()
        """Streams whose reset a finding already explains (small-packet-reset, stale-rst,
        transport-reset): no abrupt-close for them."""

    def run(self, r: Rule) -> None:
        self.rule = r
        try:
            r.check(self)
        finally:
            self.rule = None

    def add(self, conn: Connection | None, frames: Iterable[int], message: str, cause: str,
            fix: str, *, kind: str | None = None, severity: Severity | None = None,
            streams: Sequence[int] | np.ndarray = (), time_ns: int | None = None,
            **evidence: Any) -> None:
        """Report a finding of the running rule (``kind``: one of its variants). Arrays
        given as ``frames`` or ``streams`` are the finding's from then on (see
        :meth:`Numbers.taking`): a rule makes them for it and lets them go."""
        r = self.rule
        if r is None or (kind is not None and kind not in r.kinds):
            raise ValueError(f"finding of kind {kind!r} outside a rule that has it")
        named = Numbers.taking(streams) if isinstance(streams, np.ndarray) else Numbers(streams)
        stream = conn.stream if conn is not None else (named[0] if len(named) else None)
        self.findings.append(Finding(
            rule=r.id, severity=r.severity if severity is None else severity,
            stream=stream, frames=_frames(frames), message=message, cause=cause,
            fix=fix, kind=kind, streams=named if len(named) else Numbers(opt_tuple(stream)),
            time_ns=time_ns if time_ns is not None else (conn.first_ts_ns if conn else None),
            connection=label(conn) if conn is not None else "", evidence=evidence))


def _frames(frames: Iterable[int] | np.ndarray) -> Numbers:
    """A finding's frames: each once, in order (a storm's refusals give millions: numpy)."""
    if isinstance(frames, np.ndarray):
        if len(frames) > 1 and (frames[1:] > frames[:-1]).all():
            return Numbers.taking(frames)  # in order already, each once: no sorted copy
        return Numbers.taking(np.unique(frames))
    return Numbers(sorted(set(frames)))
