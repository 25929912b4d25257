"""What connection tracking finds: connections, their ends, events, closes and violations.

Plain data for every consumer (diagnose rules, the API, exports): :class:`Connection` with
its two :class:`Side` objects, the control :class:`Event` list, how it ended (:class:`Close`)
and the protocol rules each end broke (:class:`Violation`), plus the per-row :class:`Tags`
:meth:`~vsockmon.conntrack.tracker.ConnTracker.feed` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from vsockmon.wire.protocol import Op, SockType, enum_name

CLIENT, SERVER = 0, 1
"""Side indexes: the client is the end that sent the REQUEST (or is guessed to have)."""
ROLES = ("client", "server")

NONE = np.iinfo(np.int64).max
"""Sentinel of an unset 'first frame' column (minimum updates leave it alone)."""


class Close(StrEnum):
    """How a connection ended (or had not yet, when the capture stopped)."""

    GRACEFUL = "graceful"
    """Both directions were shut down (SHUTDOWN flags), then an RST ended the connection."""
    HALF_CLOSED = "half-closed"
    """Only one direction was shut down when the capture ended; no RST."""
    CLOSING = "closing"
    """Both directions shut down, but the capture ended before the final RST."""
    RESET_BY_CLIENT = "reset-by-client"
    """An RST from the client without a prior shutdown of both directions."""
    RESET_BY_SERVER = "reset-by-server"
    """An RST from the server without a prior shutdown of both directions."""
    REFUSED = "refused"
    """The server answered the REQUEST with an RST: nothing listens there."""
    UNANSWERED = "unanswered"
    """A REQUEST with neither RESPONSE nor RST before the capture ended."""
    OPEN = "open"
    """Still open when the capture ended: no SHUTDOWN, no RST."""


class Violation(StrEnum):
    """A protocol rule broken by the packets one end sent."""

    BEYOND_CREDIT = "beyond-credit"
    """An RW carrying more bytes than the peer's advertised free space."""
    AFTER_SHUTDOWN = "after-shutdown"
    """An RW after the same end sent SHUTDOWN with the SEND flag."""
    BEFORE_RESPONSE = "before-response"
    """An RW on a REQUEST-started connection before the RESPONSE."""
    TAP_LENGTH = "tap-length"
    """A frame whose captured payload length differs from the header's ``len`` (tap bug)."""


VIOLATIONS = tuple(Violation)
"""The violation kinds in a fixed order: the index of a kind in the violation columns."""

PROTOCOL_VIOLATIONS = tuple(v for v in VIOLATIONS if v is not Violation.TAP_LENGTH)
"""The kinds a peer is to blame for. A tap-length frame is the capturing kernel's artefact
(diagnose calls it benign), tracked with the others for its evidence frames but never
counted in a connection's ``violations``."""


class Event(NamedTuple):
    """One control packet of a connection: REQUEST, RESPONSE, SHUTDOWN, RST, CREDIT_REQUEST,
    or an op the protocol does not define. RW and CREDIT_UPDATE are counted, not listed."""

    frame: int
    ts_ns: int
    op: int
    sender: int
    """:data:`CLIENT` or :data:`SERVER`."""
    flags: int
    length: int
    buf_alloc: int
    fwd_cnt: int

    @property
    def op_name(self) -> str:
        return enum_name(Op, self.op)

    @property
    def sender_role(self) -> str:
        return ROLES[self.sender]


@dataclass(frozen=True, slots=True)
class Evidence:
    """How often a violation happened on one side, and where first and last."""

    count: int
    first_frame: int
    last_frame: int


@dataclass(frozen=True, slots=True)
class Stalls:
    """Zero-credit stalls of one sender: times its peer's free space was used up.

    A stall starts at the packet that leaves the sender no credit (:func:`no_credit`) and
    ends at the peer's packet (CREDIT_UPDATE, RW, …) that gives some back. One still running
    when the capture ended counts up to the capture's end (:func:`stall_end_ns`) and sets
    :attr:`open`. ``conns`` and ``diagnose`` read stalls through these two definitions only,
    so they never disagree.
    """

    count: int = 0
    total_ns: int = 0
    max_ns: int = 0
    first_frame: int | None = None
    """Frame that started the first stall."""
    longest_frame: int | None = None
    """Frame that started the longest stall."""
    open: bool = False


def no_credit(in_flight: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Where a sender has no credit left, from :class:`Tags`-style columns: its peer's
    buffer is known (``limit`` >= 0) and the bytes in flight fill it. The one test of a
    zero-credit packet, for the tracker's :class:`Stalls` and diagnose's window-full rule."""
    return (limit >= 0) & (in_flight >= limit)


def stall_end_ns(end_ns: int | None, observed_end_ns: int) -> int:
    """When a stall ended: at the peer's packet that gave credit back (``end_ns``), or, while
    none has, at the end of what was observed (the capture's last timestamp, or *now* live).

    Why not the connection's last packet: a window that fills at a connection's last packet
    and never reopens is the longest stall there is (the receiver stopped reading), not one of
    zero seconds."""
    return observed_end_ns if end_ns is None else end_ns


@dataclass(slots=True)
class Side:
    """One end of a connection, and what it sent (its direction: client→server for the
    client). Credit figures describe this end as a sender, limited by its peer's buffer."""

    role: str
    cid: int
    port: int
    packets: int = 0
    rw_packets: int = 0
    bytes: int = 0
    """Payload bytes sent: the sum of the virtio ``len`` of its RW packets."""
    messages: int | None = None
    """SEQPACKET only: messages sent (RW packets with EOM)."""
    records: int | None = None
    """SEQPACKET only: messages sent with EOR."""
    credit_updates: int = 0
    credit_requests: int = 0
    buf_alloc: int | None = None
    """The receive buffer this end advertised last (None: no credit-bearing packet)."""
    fwd_cnt: int | None = None
    """The highest fwd_cnt this end advertised (u32, as on the wire)."""
    first_rw_frame: int | None = None
    last_rw_frame: int | None = None
    shutdown_flags: int = 0
    """Union of the SHUTDOWN flags this end sent (RCV=1, SEND=2)."""
    shutdown_frame: int | None = None
    rst_frame: int | None = None
    rst_count: int = 0
    max_in_flight: int | None = None
    """Most bytes sent and not yet consumed by the peer (None: peer's credit never seen)."""
    min_credit: int | None = None
    """Least free space the peer had left for this sender (negative: credit exceeded)."""
    stalls: Stalls = field(default_factory=Stalls)
    violations: dict[Violation, Evidence] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return f"{self.cid}:{self.port}"


@dataclass(slots=True)
class Connection:
    """One stream: a virtio-vsock connection from its first to its last captured frame."""

    stream: int
    type: int
    client: Side
    server: Side
    start_seen: bool
    """True when the REQUEST was captured. False: the capture began mid-connection and the
    roles are guessed from the first frame: a RESPONSE's sender is the server; otherwise the
    end with the lower port is (services listen on small fixed ports, Linux binds clients to
    random ports above 1024); equal ports: the sender is the client."""
    first_frame: int
    last_frame: int
    first_ts_ns: int
    last_ts_ns: int
    request_frame: int | None = None
    response_frame: int | None = None
    handshake_ns: int | None = None
    """REQUEST to its answer (RESPONSE, or the refusing RST)."""
    close: Close = Close.OPEN
    close_frame: int | None = None
    """The frame that closed it: the first RST, or the last SHUTDOWN when no RST came."""
    close_by: str | None = None
    """Role of the end that sent :attr:`close_frame`."""
    events: tuple[Event, ...] = ()

    @property
    def type_name(self) -> str:
        return enum_name(SockType, self.type)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.client, self.server

    @property
    def packets(self) -> int:
        return self.client.packets + self.server.packets

    @property
    def bytes(self) -> int:
        return self.client.bytes + self.server.bytes

    @property
    def duration_ns(self) -> int:
        return self.last_ts_ns - self.first_ts_ns


class Tags(NamedTuple):
    """Per-row results of :meth:`ConnTracker.feed`, in the batch's row order.

    ``in_flight[:, s]`` is what side ``s`` has sent and its peer not yet consumed, after the
    row; ``limit[:, s]`` is the peer's buffer size for that direction; both are -1 while the
    peer's credit is unknown (and on rows without a stream). Free credit = limit - in_flight.
    """

    stream: np.ndarray
    sender: np.ndarray
    in_flight: np.ndarray
    limit: np.ndarray
    beyond: np.ndarray
    """The rows sent beyond the peer's credit: the one definition of the violation, the
    ``beyond_credit`` count of ``conns`` and the packets of diagnose's credit-violation."""
