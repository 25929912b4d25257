"""The digest's per-connection facts as numpy columns sorted by key, not Python objects.

A capture of a million connections that each end in an RST would otherwise keep a million
:class:`~vsockmon.diagnose.digest.Reset` objects (about 340 bytes each with their dict
entry) and as many small-write counters and end-of-file times; here a reset costs 57 bytes,
a counter or a time 16. They read as the mappings the rules always read
(``resets.get(stream)``, ``small_rw.get((stream, sender), 0)``,
``eof_read.get((stream, sender))``). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from vsockmon.conntrack.model import NONE


@dataclass(frozen=True, slots=True)
class Reset:
    """A stream's first RST, with the credit state of both directions then."""

    frame: int
    ts_ns: int
    sender: int
    in_flight: tuple[int, int]
    limit: tuple[int, int]


def _place(keys: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``new`` (ascending) goes in ``keys`` (ascending), and which are there."""
    pos = np.searchsorted(keys, new)
    hit = pos < len(keys)
    hit[hit] = keys[pos[hit]] == new[hit]
    return pos, hit


def _find(keys: np.ndarray, key: int) -> int:
    """The row of ``key`` in ``keys`` (ascending), or -1."""
    i = int(np.searchsorted(keys, key))
    return i if i < len(keys) and keys[i] == key else -1


class _BySender:
    """One int64 value by (stream, sender), keyed ``stream * 2 + sender`` ascending: what
    :class:`Counts` and :class:`Times` share."""

    def __init__(self) -> None:
        self._key = np.zeros(0, dtype=np.int64)
        self._value = np.zeros(0, dtype=np.int64)

    def _row(self, key: tuple[int, int]) -> int:
        i = _find(self._key, key[0] * 2 + key[1])
        if i < 0:
            raise KeyError(key)
        return i

    def drop(self, streams: set[int]) -> None:
        """Forget the values of ``streams``."""
        keep = ~np.isin(self._key // 2, np.fromiter(streams, dtype=np.int64))
        self._key, self._value = self._key[keep], self._value[keep]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((k // 2, k % 2) for k in self._key.tolist())

    def __len__(self) -> int:
        return len(self._key)


class Counts(_BySender, Mapping[tuple[int, int], int]):
    """Packets counted by (stream, sender): what ``small_rw`` counts."""

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` to the keys ``stream * 2 + sender`` (ascending, each once)."""
        pos, hit = _place(self._key, keys)
        self._value[pos[hit]] += counts[hit]
        self._key = np.insert(self._key, pos[~hit], keys[~hit])
        self._value = np.insert(self._value, pos[~hit], counts[~hit])

    def __getitem__(self, key: tuple[int, int]) -> int:
        return int(self._value[self._row(key)])


class Times(_BySender, Mapping[tuple[int, int], "int | None"]):
    """A time by (stream, sender), None while it is not known yet (held as
    :data:`~vsockmon.conntrack.model.NONE`): what ``eof_read`` holds."""

    def new(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` (``stream * 2 + sender``, ascending) are not held."""
        return ~_place(self._key, keys)[1]

    def add(self, keys: np.ndarray, ns: np.ndarray) -> None:
        """Hold ``keys`` (ascending, none held yet) with their times (NONE: not known)."""
        pos, _ = _place(self._key, keys)
        self._key = np.insert(self._key, pos, keys)
        self._value = np.insert(self._value, pos, ns)

    def unknown(self) -> np.ndarray:
        """The keys whose time is not known yet."""
        return self._key[self._value == NONE]

    def learn(self, key: int, ns: int) -> None:
        """The time of a held ``key`` (``stream * 2 + sender``)."""
        self._value[_find(self._key, key)] = ns

    def __getitem__(self, key: tuple[int, int]) -> int | None:
        ns = int(self._value[self._row(key)])
        return None if ns == NONE else ns


class Resets(Mapping[int, Reset]):
    """Each stream's first RST, by stream: :class:`Reset` objects made when read."""

    def __init__(self) -> None:
        self._stream = np.zeros(0, dtype=np.int64)
        """Ascending."""
        self._frame = np.zeros(0, dtype=np.int64)
        self._ts = np.zeros(0, dtype=np.int64)
        self._sender = np.zeros(0, dtype=np.int8)
        self._in_flight = np.zeros((0, 2), dtype=np.int64)
        self._limit = np.zeros((0, 2), dtype=np.int64)

    def add(self, streams: np.ndarray, frame: np.ndarray, ts: np.ndarray, sender: np.ndarray,
            in_flight: np.ndarray, limit: np.ndarray) -> None:
        """The first RSTs of ``streams`` (ascending, none held yet): one row each."""
        pos, _ = _place(self._stream, streams)
        self._stream = np.insert(self._stream, pos, streams)
        self._frame = np.insert(self._frame, pos, frame)
        self._ts = np.insert(self._ts, pos, ts)
        self._sender = np.insert(self._sender, pos, sender)
        self._in_flight = np.insert(self._in_flight, pos, in_flight, axis=0)
        self._limit = np.insert(self._limit, pos, limit, axis=0)

    def drop(self, streams: set[int]) -> None:
        """Forget the resets of ``streams``."""
        keep = ~np.isin(self._stream, np.fromiter(streams, dtype=np.int64))
        for name in ("_stream", "_frame", "_ts", "_sender", "_in_flight", "_limit"):
            setattr(self, name, getattr(self, name)[keep])

    def __getitem__(self, stream: int) -> Reset:
        i = _find(self._stream, stream)
        if i < 0:
            raise KeyError(stream)
        fl, lim = self._in_flight[i].tolist(), self._limit[i].tolist()
        return Reset(int(self._frame[i]), int(self._ts[i]), int(self._sender[i]),
                     (fl[0], fl[1]), (lim[0], lim[1]))

    def __iter__(self) -> Iterator[int]:
        return iter(self._stream.tolist())

    def __len__(self) -> int:
        return len(self._stream)
