"""Findings across captures: which rules fire, on how many captures and hosts, and where
worst. No I/O here: the input is each capture's ``vsockmon diagnose --json`` objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vsockmon.diagnose.model import Severity
from vsockmon.fleet.sources import Capture

EXAMPLES = 3
"""Captures shown for each rule: those where it fires most often."""


def tagged(capture: Capture, finding: dict[str, Any]) -> dict[str, Any]:
    """A finding as ``fleet diagnose --json`` prints it: where it was, then what it is."""
    return {"host": capture.host, "capture": capture.name, "source": capture.source,
            **finding}


def rule_id(finding: dict[str, Any]) -> str:
    """``rule/kind`` when the finding has a kind, else the rule (as diagnose prints it)."""
    return f"{finding['rule']}/{finding['kind']}" if finding.get("kind") else finding["rule"]


@dataclass
class RuleGroup:
    """One rule (or rule/kind) across the fleet."""

    rule: str
    severity: Severity
    """The highest severity among its findings."""
    findings: int = 0
    captures: dict[Capture, list[dict[str, Any]]] = field(default_factory=dict)
    """Each capture where it fires, with its findings there."""

    @property
    def hosts(self) -> int:
        return len({c.host for c in self.captures})

    def examples(self, n: int = EXAMPLES) -> list[tuple[Capture, list[dict[str, Any]]]]:
        """The ``n`` captures where the rule fires most often (then by host and name)."""
        return sorted(self.captures.items(),
                      key=lambda item: (-len(item[1]), item[0].host, item[0].name))[:n]


def group(results: Iterable[tuple[Capture, list[dict[str, Any]]]]) -> list[RuleGroup]:
    """Findings grouped by rule: the most severe rules first, then the most widespread."""
    groups: dict[str, RuleGroup] = {}
    for capture, findings in results:
        for f in findings:
            key = rule_id(f)
            severity = Severity.parse(f["severity"])
            g = groups.setdefault(key, RuleGroup(key, severity))
            g.severity = max(g.severity, severity)
            g.findings += 1
            g.captures.setdefault(capture, []).append(f)
    return sorted(groups.values(), key=lambda g: (-g.severity, -len(g.captures), g.rule))
