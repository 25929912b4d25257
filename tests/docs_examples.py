"""The fenced examples of README.md and docs/*.md, parsed so the tests can run them.

Every fenced block is one of:

- a shell session: lines starting with ``$ `` are commands (a command continues on the
  next lines while its quotes are open or it ends with ``\\``); the lines up to the next
  command are its output, compared with what it prints (stdout and stderr together);
- Python: ``>>>`` blocks run as doctests, other Python blocks run as they are; the blocks
  of one page share one namespace, in page order;
- marked by an HTML comment on the line before the fence (a blank line between is allowed):
  ``<!-- output of: COMMAND -->`` (the block is what COMMAND prints; compared),
  ``<!-- excerpt of: COMMAND -->`` (the block is a contiguous part of what it prints),
  ``<!-- run each line -->`` (a list of invocations without output: each line runs and must
  exit 0; a ``#`` comment ends the command; ``<!-- run each line: with the plugin
  installed -->`` runs them with the Wireshark plugin in the personal plugins folder),
  ``<!-- lab -->`` (a session that boots the lab VM: run by the lab tests, marker ``lab``),
  ``<!-- not run: REASON -->`` (needs root, a live kernel, a cluster; a diagram; a sketch).

In the sandbox the examples run in, ``cap.pcap``, ``capture.pcap`` and ``c.pcap`` (the
names the pages use for "your capture") are a healthy real capture of the fixtures, and
``captures/`` is ``fixtures/real/``.

An unmarked block that is neither a session nor Python is an error: every example either
runs or says why not.

Output comparison: the words, numbers and symbols, in order, must be the same; blank lines
and how blanks and line breaks are laid out do not count (pages wrap long lines and realign
tables where a column is left out). A line that is only ``...`` or ``…`` (and perhaps a
``(comment)``) stands for
any number of lines, and ``…`` inside a line for any text. A command is expected to exit
0 unless its comment (or the marker's command) says ``# exit status N``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
KINDS = ("output of", "excerpt of", "not run", "run each line", "lab")
RUN = ("session", "output of", "excerpt of", "run each line", "lab")  # run as shell commands
_MARKER = re.compile(rf"^\s*<!--\s*({'|'.join(KINDS)})\b:?\s*(.*?)\s*-->\s*$")
_EXIT = re.compile(r"#.*\bexit status (\d+)")
ELISION = re.compile(r"^\s*(?:\.\.\.|…)\s*(?:\(.*\))?\s*$")


@dataclass
class Command:
    """One ``$`` command of a session and the output shown under it."""

    text: str
    output: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        m = _EXIT.search(self.text)
        return int(m.group(1)) if m else 0


@dataclass
class Block:
    """One fenced block: where it is, its info string, its lines and its marker if any."""

    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    lines: list[str]
    marker: tuple[str, str] | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        """``not run``, ``output of``, ``session``, ``doctest``, ``python`` or ``unknown``."""
        if self.marker:
            return self.marker[0]
        if self.lang == "python":
            return "doctest" if any(s.lstrip().startswith(">>>") for s in self.lines) \
                else "python"
        if self.lines and self.lines[0].startswith("$ "):
            return "session"
        return "unknown"

    def commands(self) -> list[Command]:
        """The session's commands with their shown output; for ``run each line``, each
        command (comment lines skipped) with any output allowed."""
        out: list[Command] = []
        each = self.kind == "run each line"
        # kinds "session" and "lab": the first line is a command
        i = 0
        while i < len(self.lines):
            text = self.lines[i]
            if each and (not text.strip() or text.lstrip().startswith("#")):
                i += 1
                continue
            if not each and not text.startswith("$ "):
                out[-1].output.append(text)
                i += 1
                continue
            cmd = text if each else text[2:]
            while not _complete(cmd) and i + 1 < len(self.lines):
                i += 1
                cmd += "\n" + self.lines[i]
            out.append(Command(cmd, ["..."] if each else []))
            i += 1
        return out


def _complete(cmd: str) -> bool:
    """Whether ``cmd`` is a whole shell command (no open quote, no trailing backslash)."""
    if cmd.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(cmd, comments=True)
    except ValueError:
        return False
    return True


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        body = [s[len(indent):] if s.startswith(indent) else s for s in lines[i + 1:j]]
        found.append(Block(page, i + 1, lang, body, _marker_before(lines, i)))
        i = j + 1
    return found


def _marker_before(lines: list[str], fence: int) -> tuple[str, str] | None:
    k = fence - 1
    if k >= 0 and not lines[k].strip():
        k -= 1
    m = _MARKER.match(lines[k]) if k >= 0 else None
    return (m.group(1), m.group(2)) if m else None


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def _pattern(shown: list[str]) -> str:
    """A regular expression for the text ``shown`` stands for, on whitespace-collapsed text:
    an elision line is any text, ``…`` inside a line too."""
    parts: list[str] = []
    for line in shown:
        if ELISION.match(line):
            parts.append(".*")
        elif line.strip():
            parts.append(r"\s*.*\s*".join(re.escape(" ".join(p.split())) for p in
                                           line.split("…")))
    return r"\s*".join(parts)


def output_matches(shown: list[str], actual: list[str], excerpt: bool = False) -> bool:
    """Whether ``actual`` is what ``shown`` shows (all of it, or a part if ``excerpt``).

    The lines are compared as one text with each run of blanks and line breaks as one space:
    the pages wrap long lines and realign tables where a column is left out; the words and
    numbers, in order, must be the same."""
    text = " ".join(" ".join(actual).split())
    pattern = _pattern(shown)
    if excerpt:
        pattern = rf"(?:.*\s)?{pattern}(?:\s.*)?"
    return re.fullmatch(pattern, text, re.DOTALL) is not None
