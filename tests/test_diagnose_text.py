"""The words of every finding, as docs/diagnose.md promises them, produced in this process.

tests/test_docs_examples.py already runs the page's examples, but as subprocesses: a
mutation run (benchmarks/mutation.py) cannot see what they reach, so a rule's message,
cause or fix could change unnoticed by it. Here each ``vsockmon diagnose`` example of the
page runs through click's test runner, in-process, and what it prints must match what the
page shows (the same comparison rules, tests/docs_examples.py). The page is the source of
the expected text: it was written as the explanation each finding gives, and a changed
message has to change the page too.
"""

from __future__ import annotations

import re
import shlex

import pytest
from click.testing import CliRunner
from docs_examples import ROOT, Command, blocks, output_matches

from vsockmon.cli import main

PAGE = ROOT / "docs" / "diagnose.md"
# `for f in A B; do vsockmon diagnose X$f.pcap; done`: one example that shows two files
_LOOP = re.compile(r"^for (\w+) in ([^;]+); do (.+); done$")


def _examples() -> list[tuple[str, Command, bool]]:
    """(id, command, excerpt?) of each diagnose example of the page that shows output."""
    out = []
    for b in blocks(PAGE):
        if b.kind in ("output of", "excerpt of") and b.marker is not None:
            out.append((b.id, Command(b.marker[1], b.lines), b.kind == "excerpt of"))
        elif b.kind == "session":
            out += [(f"{b.id}:{i}", c, False) for i, c in enumerate(b.commands())]
    return [e for e in out if "vsockmon diagnose" in e[1].text]


def _invocations(text: str) -> list[list[str]]:
    """The argument lists of the ``vsockmon`` runs one example's command makes."""
    words = " ".join(shlex.split(text, comments=True))
    loop = _LOOP.match(words)
    if loop is None:
        return [shlex.split(words)[1:]]
    var, values, body = loop.groups()
    return [shlex.split(body.replace(f"${var}", v))[1:] for v in values.split()]


EXAMPLES = _examples()


def test_the_page_has_an_example_of_every_finding_it_explains() -> None:
    """The examples this file runs: one per rule section of the page, plus the overview's."""
    assert len(EXAMPLES) >= 20
    assert all(_invocations(c.text)[0][0] == "diagnose" for _, c, _ in EXAMPLES)


@pytest.mark.parametrize(("command", "excerpt"), [e[1:] for e in EXAMPLES],
                         ids=[e[0] for e in EXAMPLES])
def test_a_diagnose_example_prints_what_the_page_shows(
        command: Command, excerpt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the examples name fixtures/… relative to the repository
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("NO_COLOR", "1")
    printed: list[str] = []
    codes = []
    for args in _invocations(command.text):
        result = CliRunner().invoke(main, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception)
        codes.append(result.exit_code)
        printed += result.output.splitlines()
    assert max(codes) == command.exit_status
    assert output_matches(command.output, printed, excerpt=excerpt), (
        f"$ {command.text}\n--- shown\n" + "\n".join(command.output)
        + "\n--- printed\n" + "\n".join(printed))
