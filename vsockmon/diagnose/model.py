"""What a diagnosis is made of: severities, thresholds, rules and findings.

Plain data, no analysis: the engine (:mod:`vsockmon.diagnose.engine`) runs the rules
(:mod:`vsockmon.diagnose.rules`, registered in :mod:`vsockmon.diagnose.registry`) and every
output (the CLI, the API, pcapng comments, timeline markers) reads these types.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import total_ordering
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from vsockmon.conntrack.spill import Packed

if TYPE_CHECKING:
    from vsockmon.diagnose.registry import Context


class Severity(IntEnum):
    """How bad a finding is; the CLI's exit code is 1 from WARNING up."""

    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.upper()]


def _limit(default: float, unit: str, doc: str) -> Any:
    return field(default=default, metadata={"unit": unit, "doc": doc})


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against; the defaults suit Linux peers.

    Each field's ``metadata`` holds its unit and a one-line doc (the CLI's options are made
    from them).
    """

    no_transport_s: float = _limit(
        2.0, "s", "a REQUEST unanswered this long counts as never answered (Linux's own "
        "connect timeout is 2 s)")
    stall_s: float = _limit(
        1.0, "s", "a full window whose receiver's fwd_cnt stays frozen this long is reported "
        "(bulk transfers fill it for milliseconds all the time: flow control at work)")
    credit_reply_s: float = _limit(
        1.0, "s", "a CREDIT_REQUEST followed by nothing at all from the peer for this long is "
        "unanswered")
    half_close_s: float = _limit(
        1.0, "s", "silence after a one-sided SHUTDOWN(SEND), up to the capture's end, that "
        "makes a hang")
    half_close_stall_s: float = _limit(
        1.0, "s", "a one-sided SHUTDOWN(SEND) whose peer sends no data and closes (or is given "
        "up on) only this much later makes a stall")
    unread_grace_s: float = _limit(
        0.01, "s", "bytes still unconsumed at a reset count as discarded only if they had "
        "waited this long (younger ones may have crossed the close)")
    small_rw_bytes: int = _limit(
        1024, "bytes", "an RW with a smaller payload is a small write")
    small_rw_count: int = _limit(
        64, "packets", "this many small writes before a reset make the small-packet-reset "
        "pattern")
    transport_reset_count: int = _limit(
        2, "connections", "established connections one CID resets having forgotten them all "
        "at once (RSTs with buf_alloc 0, nothing from it since before the first) that make "
        "a transport reset")
    retry_count: int = _limit(
        3, "attempts", "attempts to one CID:port, all but the last failed, that make a retry "
        "loop")
    retry_gap_s: float = _limit(
        60.0, "s", "attempts further apart than this belong to different retry loops")
    accept_queue_s: float = _limit(
        2.0, "s", "a refused REQUEST is an accept-queue overflow when the same CID:port "
        "accepted another connection (RESPONSE) at most this long before, still open then")


@dataclass(frozen=True)
class Rule:
    """A rule as data: its stable id, its usual severity, a one-line title, the variants it
    reports (``kinds``), the check that finds it, and the rules whose conclusions the check
    reads (``after``: they run before it)."""

    id: str
    severity: Severity
    title: str
    check: Callable[[Context], None] = field(repr=False, compare=False)
    kinds: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


_SLICE = 65536
"""Numbers made Python ints (or text) at a time: a storm's million never all at once; and
the count from which they are kept packed."""


@total_ordering
class Numbers(Sequence[int]):
    """A finding's frame or stream numbers: a read-only int64 array that reads as a tuple.

    A storm's one finding names a million streams and two million frames; as a tuple of
    Python ints they would cost 36 bytes each, as int64 8. From :data:`_SLICE` numbers on
    they are kept a slice at a time as the spill's :class:`~vsockmon.conntrack.spill.Packed`
    columns (a run of consecutive streams or evenly spaced frames packs to a few bytes),
    unpacked a slice at a time as they are read. It equals, and orders against, the tuple of
    its values, so ``f.frames == (3, 4)`` reads as it always did.
    """

    __slots__ = ("_a", "_n")

    def __init__(self, values: Iterable[int] | np.ndarray = ()) -> None:
        self._keep(np.array(values if isinstance(values, np.ndarray) else list(values),
                            dtype=np.int64))

    @classmethod
    def taking(cls, a: np.ndarray) -> Numbers:
        """The numbers of ``a``, an array made for them that its maker lets go: an int64
        array of its own is kept as it is (made read-only) or packed, never copied whole —
        a storm's million frames are not held twice while a finding is made."""
        if a.dtype != np.int64 or a.base is not None or not a.flags.c_contiguous:
            return cls(a)
        n = cls.__new__(cls)
        n._keep(a)
        return n

    def _keep(self, a: np.ndarray) -> None:
        """Hold ``a``: itself (read-only) when short, else packed a slice at a time (the
        packing's scratch arrays stay the size of a slice)."""
        self._n = len(a)
        if self._n < _SLICE:
            a.flags.writeable = False
            self._a: np.ndarray | list[Packed] = a
        else:
            self._a = [Packed(a[lo:lo + _SLICE]) for lo in range(0, self._n, _SLICE)]

    def _slices(self) -> Iterator[np.ndarray]:
        """The numbers a slice of at most :data:`_SLICE` at a time."""
        if isinstance(self._a, np.ndarray):
            for lo in range(0, self._n, _SLICE):
                yield self._a[lo:lo + _SLICE]
        else:
            for part in self._a:
                yield part.rows(0, part.shape[0])

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[int, ...]: ...
    def __getitem__(self, i: int | slice) -> int | tuple[int, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(self._n)[i])
        j = range(self._n)[i]  # IndexError as a tuple's
        if isinstance(self._a, np.ndarray):
            return int(self._a[j])
        part = self._a[j // _SLICE]
        return int(part.rows(j % _SLICE, j % _SLICE + 1)[0])

    def __iter__(self) -> Iterator[int]:
        for a in self._slices():
            yield from a.tolist()

    def _tuple(self, other: object) -> tuple[int, ...] | None:
        if isinstance(other, Numbers):
            return tuple(other)
        return tuple(other) if isinstance(other, (tuple, list)) else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Numbers):
            return len(self) == len(other) and all(
                np.array_equal(a, b) for a, b in zip(self._slices(), other._slices(),
                                                     strict=True))
        theirs = self._tuple(other)
        return NotImplemented if theirs is None else tuple(self) == theirs

    def __lt__(self, other: object) -> bool:
        theirs = self._tuple(other)
        return NotImplemented if theirs is None else tuple(self) < theirs

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    @property
    def nbytes(self) -> int:
        """Bytes the numbers are held in."""
        if isinstance(self._a, np.ndarray):
            return self._a.nbytes
        return sum(part.nbytes for part in self._a)

    def array(self) -> np.ndarray:
        """The numbers as a (read-only) numpy array (made whole: for the few that are
        long, a caller reads :meth:`pieces`)."""
        if isinstance(self._a, np.ndarray):
            return self._a
        a = np.concatenate(list(self._slices()))
        a.flags.writeable = False
        return a

    def text(self, sep: str = ", ") -> str:
        """The numbers in decimal, ``sep`` between."""
        return "".join(self.pieces(sep))

    def pieces(self, sep: str = ", ") -> Iterator[str]:
        """:meth:`text` a slice at a time: a million numbers never exist as Python ints or
        strings at once."""
        for k, a in enumerate(self._slices()):
            yield (sep if k else "") + sep.join(map(str, a.tolist()))


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem with its proof, explanation and fix."""

    rule: str
    severity: Severity
    stream: int | None
    """The connection it concerns (the first one when it spans several); None: the capture."""
    frames: Numbers
    """The frames that show it, in order (a tuple given is made :class:`Numbers`)."""
    message: str
    cause: str
    fix: str
    kind: str | None = None
    """Which variant of the rule (see :attr:`Rule.kinds`)."""
    streams: Numbers = field(default_factory=Numbers)
    """Every connection concerned, :attr:`stream` first."""
    time_ns: int | None = None
    """When it shows: the time of its first evidence frame."""
    connection: str = ""
    """The connection as ``client → server TYPE``."""
    evidence: Mapping[str, Any] = field(default_factory=dict)
    """The numbers that matter, by name (bytes, seconds, frame numbers)."""

    def __post_init__(self) -> None:
        for name in ("frames", "streams"):
            if not isinstance(getattr(self, name), Numbers):
                object.__setattr__(self, name, Numbers(getattr(self, name)))

    @property
    def rule_id(self) -> str:
        """``rule/kind`` when the rule has variants, else the rule id."""
        return f"{self.rule}/{self.kind}" if self.kind else self.rule

    def to_dict(self, start_ns: int | None = None) -> dict[str, Any]:
        """The JSON object of ``--json``; ``t`` is seconds since ``start_ns`` when given."""
        head, tail = self._json_parts(start_ns)
        return {**head, "streams": list(self._streams()), "frames": list(self.frames), **tail}

    def to_json(self, start_ns: int | None = None) -> str:
        """:meth:`to_dict` as one line of JSON."""
        return "".join(self.json_pieces(start_ns))

    def json_pieces(self, start_ns: int | None = None) -> Iterator[str]:
        """:meth:`to_json` in pieces, its numbers written straight from their arrays: a
        storm's finding names millions, and neither a list of Python ints nor the whole line
        is ever made for them."""
        head, tail = self._json_parts(start_ns)
        yield json.dumps(head, ensure_ascii=False)[:-1] + ', "streams": ['
        yield from self._streams().pieces()
        yield '], "frames": ['
        yield from self.frames.pieces()
        yield "], " + json.dumps(tail, ensure_ascii=False)[1:]

    def _streams(self) -> Numbers:
        return self.streams or Numbers(opt_tuple(self.stream))

    def _json_parts(self, start_ns: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The JSON object's members before ``streams`` and ``frames``, and after them."""
        head = {"rule": self.rule, "kind": self.kind, "severity": str(self.severity),
                "stream": self.stream}
        tail: dict[str, Any] = {"time_ns": self.time_ns}
        if start_ns is not None and self.time_ns is not None:
            tail["t"] = round((self.time_ns - start_ns) / 1e9, 9)
        tail.update(connection=self.connection, message=self.message, cause=self.cause,
                    fix=self.fix, evidence=dict(self.evidence))
        return head, tail


def opt_tuple(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)


def rank(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; then by stream (capture-wide last) and first frame."""
    return sorted(findings, key=lambda f: (-f.severity, f.stream is None, f.stream or 0,
                                           f.frames[:1], f.rule))
