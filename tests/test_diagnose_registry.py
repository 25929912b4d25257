"""Diagnose rules are data: registered with an id, a severity and a check, run in an order
their declared dependencies fix."""

from __future__ import annotations

import pytest

from vsockmon.diagnose.engine import RULES
from vsockmon.diagnose.model import Rule, Severity
from vsockmon.diagnose.registry import Context, in_order, rule


def test_every_rule_is_registered_once_with_its_check() -> None:
    assert len(RULES) == 19
    for rule_id, r in RULES.items():
        assert r.id == rule_id and isinstance(r.severity, Severity) and r.title
        assert callable(r.check) and r.check.__name__ == rule_id.replace("-", "_")
        assert set(r.after) <= set(RULES)


def test_rules_run_after_the_rules_whose_conclusions_they_read() -> None:
    order = [r.id for r in in_order(RULES)]
    assert sorted(order) == sorted(RULES)
    for r in RULES.values():
        assert all(order.index(dep) < order.index(r.id) for dep in r.after)
    # an overflowing accept queue explains refusals before they are called no-listener
    assert order.index("accept-queue-full") < min(order.index(d) for d in (
        "no-listener", "seqpacket-refused", "dial-retry"))
    # resets that another rule explains are not also called abrupt closes
    assert order.index("abrupt-close") > max(order.index(d) for d in (
        "small-packet-reset", "stale-rst", "transport-reset"))
    # mid-capture reads what five others explain, so it runs after all of them
    assert order.index("mid-capture") > max(order.index(d) for d in (
        "cid-mismatch", "state-lost", "no-transport", "window-full", "half-close-hang"))


def _noop(_ctx: Context) -> None:
    return None


def test_in_order_refuses_unknown_and_circular_dependencies() -> None:
    a = Rule("a", Severity.INFO, "a", _noop, after=("b",))
    b = Rule("b", Severity.INFO, "b", _noop, after=("a",))
    with pytest.raises(ValueError, match=r"in a circle: a → b$"):  # the path that closed it
        in_order({"a": a, "b": b})
    with pytest.raises(ValueError, match="unknown rule 'b'"):
        in_order({"a": a})
    c = Rule("c", Severity.INFO, "c", _noop)
    assert [r.id for r in in_order({"a": a, "c": c, "b": Rule("b", Severity.INFO, "b", _noop)})
            ] == ["b", "a", "c"]


def test_a_rule_id_is_registered_only_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        rule("no-listener", Severity.ERROR, "again")(_noop)
    assert RULES["no-listener"].check is not _noop


def test_a_registered_rule_keeps_every_field_it_was_given() -> None:
    """``rule`` returns the check unchanged and files the rule under its id with its id,
    severity, title, check, kinds and ``after`` (removed again: RULES is the real registry)."""
    try:
        registered = rule("test-only", Severity.WARNING, "a title", kinds=("one", "two"),
                          after=("no-listener",))(_noop)
        assert registered is _noop
        r = RULES["test-only"]
        assert (r.id, r.severity, r.title, r.check, r.kinds, r.after) == (
            "test-only", Severity.WARNING, "a title", _noop, ("one", "two"), ("no-listener",))
    finally:
        RULES.pop("test-only", None)


def test_a_finding_outside_its_rule_or_of_an_unknown_kind_is_refused() -> None:
    from vsockmon.diagnose.digest import Digest
    from vsockmon.diagnose.model import Thresholds

    ctx = Context([], Digest(Thresholds()), Thresholds(), 0, True)
    with pytest.raises(ValueError, match="outside a rule that has it"):
        ctx.add(None, [1], "m", "c", "f")
    ctx.rule = RULES["window-full"]
    with pytest.raises(ValueError):
        ctx.add(None, [1], "m", "c", "f", kind="no-such-kind")
    ctx.add(None, [1], "m", "c", "f", kind="deadlock", streams=[4])
    assert [(f.rule_id, f.stream, f.severity) for f in ctx.findings] == [
        ("window-full/deadlock", 4, Severity.WARNING)]


def test_after_a_rule_has_run_a_finding_is_refused_again() -> None:
    """The running rule is forgotten when its check returns: a finding added later has no
    rule to belong to."""
    from vsockmon.diagnose.digest import Digest
    from vsockmon.diagnose.model import Thresholds

    ctx = Context([], Digest(Thresholds()), Thresholds(), 0, True)
    ctx.run(RULES["window-full"])
    assert ctx.rule is None
    with pytest.raises(ValueError, match="outside a rule that has it"):
        ctx.add(None, [1], "m", "c", "f", kind="deadlock")
