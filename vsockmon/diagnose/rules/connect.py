"""Rules about setting a connection up: refused, unanswered, retried, or lost on one side."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from vsockmon.conntrack.tracker import CLOSES, Close, Connection
from vsockmon.diagnose.connections import Index, present
from vsockmon.diagnose.digest import HOST_CID
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import (
    FAILED,
    OPEN_ENDS,
    delay_text,
    event_at,
    request_ts,
    seconds_text,
)
from vsockmon.wire.protocol import SockType


@dataclass
class _Refused:
    """The refused REQUESTs of one client CID to one target (CID, port, socket type), as
    index rows in stream order (a storm holds a million: no Connection each)."""

    ctx: Context
    rows: np.ndarray
    cid: int
    port: int
    typ: int

    @cached_property
    def first(self) -> Connection:
        return self.ctx.conns.at(int(self.rows[0]))

    @property
    def frames(self) -> np.ndarray:
        ix = self.ctx.conns.index
        both = np.column_stack((ix.take("request_frame", self.rows),
                                ix.take("close_frame", self.rows))).ravel()
        return both[present(both) & (both != 0)]

    @property
    def max_delay(self) -> int | None:
        """The longest REQUEST-to-RST delay seen (None: none seen)."""
        hs = self.ctx.conns.index.take("handshake", self.rows)
        hs = hs[present(hs)]
        return int(hs.max()) if len(hs) else None

    @property
    def target(self) -> str:
        return f"{self.cid}:{self.port}"

    @property
    def times(self) -> str:
        return "" if len(self.rows) == 1 else f" {len(self.rows)} times"

    def evidence(self) -> dict[str, Any]:
        return dict(streams=self.ctx.conns.index.take("stream", self.rows),
                    time_ns=request_ts(self.first), refusals=len(self.rows),
                    rst_delay_ms=round((self.max_delay or 0) / 1e6, 3),
                    target=self.target)


def _refused(ctx: Context, seqpacket: bool) -> list[_Refused]:
    """Refused REQUESTs of one socket type that no earlier finding explains, by target."""
    ix = ctx.conns.index
    rows = np.flatnonzero(ix.closed(Close.REFUSED) & ~ix.among(ctx.unestablished)
                          & ((ix.type == SockType.SEQPACKET) == seqpacket))
    keys = (ix.client_cid, ix.server_cid, ix.server_port, ix.type)  # each read once
    return [_Refused(ctx, g, *(int(k[g[0]]) for k in keys[1:]))
            for g in ix.groups(rows, keys)]


class _Old(NamedTuple):
    """The connection whose address pair a REQUEST reused."""

    stream: int
    last_frame: int
    close: Close


_OPEN_CODES = [CLOSES.index(k) for k in OPEN_ENDS]


class _Accepted(NamedTuple):
    """What a refusal's queue witness needs of an accepted connection."""

    stream: int
    response_frame: int
    answered_ns: int
    close_frame: int | None
    first_frame: int


@rule("accept-queue-full", Severity.ERROR, "REQUEST refused by RST while the port accepts "
      "other connections: the listener's accept queue is full",
      after=("cid-mismatch", "state-lost"))
def accept_queue_full(ctx: Context) -> None:
    """Refusals a listener that exists explains: Linux answers a REQUEST with RST when the
    accept queue is full (``sk_acceptq_is_full`` in ``virtio_transport_recv_listen``), the
    same RST as "nothing listens". The proof a listener was there: the same CID:port
    accepted another connection shortly before, and that connection was still open."""
    groups = _refused(ctx, seqpacket=False) + _refused(ctx, seqpacket=True)
    accepted = _accepted_by_target(ctx, {(g.cid, g.port, g.typ) for g in groups})
    ix = ctx.conns.index
    for group in groups:
        candidates = accepted.get((group.cid, group.port, group.typ), [])
        if not candidates:
            continue
        asked = ix.take("first_ts", group.rows)  # request_ts: a REQUEST is its first packet
        frame = ix.take("request_frame", group.rows)
        frame = np.where(present(frame), frame, ix.take("first_frame", group.rows))
        overflowed = [(r, w) for r, a, f in zip(group.rows.tolist(), asked.tolist(),
                                                frame.tolist(), strict=True)
                      if (w := _queue_witness(ctx, a, f, candidates)) is not None]
        if not overflowed:
            continue
        rows = np.array([r for r, _ in overflowed], dtype=np.int64)
        witness = overflowed[0][1]
        ctx.unestablished.update(ix.take("stream", rows).tolist())
        ctx.queue_refused.update(ix.take("stream", rows).tolist())
        _report_overflow(ctx, _Refused(ctx, rows, group.cid, group.port, group.typ), witness)


def _accepted_by_target(
    ctx: Context, targets: set[tuple[int, int, int]]
) -> dict[tuple[int, int, int], list[_Accepted]]:
    """The accepted connections of each refused target, in RESPONSE order: one pass over
    the index, so a storm of refusals does not rescan them all for each one."""
    found: dict[tuple[int, int, int], list[_Accepted]] = defaultdict(list)
    ix = ctx.conns.index
    if not targets:
        return found
    maybe = present(ix.response_frame) & np.isin(ix.server_port, [p for _, p, _ in targets])
    for c in ctx.conns.pick(np.flatnonzero(maybe)):
        key = (c.server.cid, c.server.port, c.type)
        if c.response_frame is not None and key in targets:
            found[key].append(_Accepted(c.stream, c.response_frame, _answered_ns(c),
                                        c.close_frame, c.first_frame))
    for conns in found.values():
        conns.sort(key=lambda c: c.response_frame)
    return found


def _queue_witness(ctx: Context, asked: int, frame: int, accepted: list[_Accepted]
                   ) -> _Accepted | None:
    """The latest connection to a refused one's target accepted at most ``accept_queue_s``
    before its REQUEST (sent at ``asked``, frame ``frame``) and still open at it (None: no
    such). ``accepted`` is in RESPONSE order; the walk back stops at the first RESPONSE that
    is older than the window (frames are in capture order, so older ones are too)."""
    start = bisect_left(accepted, frame, key=lambda c: c.response_frame)
    for i in range(start - 1, -1, -1):
        c = accepted[i]
        if (asked - c.answered_ns) / 1e9 > ctx.t.accept_queue_s:
            return None
        if c.close_frame is None or c.close_frame > frame:
            return c
    return None


def _answered_ns(conn: Connection) -> int:
    """When the connection's RESPONSE was sent."""
    ev = event_at(conn, conn.response_frame)
    return ev.ts_ns if ev is not None else conn.first_ts_ns


def _report_overflow(ctx: Context, group: _Refused, witness: _Accepted) -> None:
    first = group.first
    before = request_ts(first) - witness.answered_ns
    ctx.add(first, np.r_[group.frames, witness.response_frame or witness.first_frame],
            f"The accept queue of {group.target} overflowed: the {first.type_name} REQUEST "
            f"from {first.client.addr} (frame {first.request_frame}) was refused"
            f"{group.times} by an RST, while that port had accepted stream "
            f"{witness.stream} (RESPONSE at frame {witness.response_frame}, "
            f"{delay_text(max(before, 0))} earlier, still open).",
            "A socket listens there, but more connections waited for accept() than its "
            "backlog allows: Linux then answers a REQUEST with RST, exactly as when nothing "
            "listens (sk_acceptq_is_full in virtio_transport_recv_listen). The server "
            "accepts too slowly for its clients' bursts, or listen() got a small backlog.",
            "Give listen() a backlog sized for the bursts (the kernel caps it at "
            "net.core.somaxconn, 4096 by default) and accept in a loop that hands each "
            "connection over at once; clients may retry a refused connect after a back-off.",
            accepted_stream=witness.stream, **group.evidence())


@rule("no-listener", Severity.ERROR, "STREAM REQUEST refused by RST: nothing listens there",
      after=("cid-mismatch", "state-lost", "accept-queue-full"))
def no_listener(ctx: Context) -> None:
    """Refused STREAM REQUESTs, one finding per target."""
    accepted = _answered(ctx)
    ix = ctx.conns.index
    for group in _refused(ctx, seqpacket=False):
        first, cid, port, typ = group.first, group.cid, group.port, group.typ
        later = _accepted(ctx, accepted, (cid, port, typ), after=first.request_frame or 0)
        frames, delay, times, target = group.frames, group.max_delay, group.times, group.target
        common = group.evidence()
        message = (f"Nothing listens on {target}: the STREAM REQUEST from {first.client.addr} "
                   f"(frame {first.request_frame}) was refused{times} by an RST within "
                   f"{delay_text(delay)}.")
        severity = None
        fix = (f"Start the service on CID {cid} (or point the client at the port it really "
               f"uses), and have the client report ECONNRESET from connect() instead of "
               f"retrying silently.")
        if later is not None:
            severity = Severity.WARNING
            message += (f" A later attempt (stream {ix.take('stream', later)}, frame "
                        f"{ix.take('response_frame', later)}) was accepted: the service "
                        f"started late.")
            fix = ("Start the client once the service listens (wait for its readiness "
                   "notification) rather than racing it.")
        ctx.add(first, frames, message,
                f"No socket listens on port {port} at CID {cid}: the service is not started "
                f"(yet), listens on another port, or has crashed. A client that retries turns "
                f"this immediate refusal into a timeout.", fix, severity=severity, **common)


def _answered(ctx: Context) -> dict[tuple[int, int, int], np.ndarray]:
    """The index rows of the connections that got a RESPONSE, by target (CID, port, socket
    type), in stream order: one grouping, however many targets were refused."""
    ix = ctx.conns.index
    rows = np.flatnonzero(present(ix.response_frame) & (ix.response_frame != 0))
    cid, port, typ = keys = (ix.server_cid, ix.server_port, ix.type)  # each read once
    return {(int(cid[g[0]]), int(port[g[0]]), int(typ[g[0]])): g
            for g in ix.groups(rows, keys)}


def _accepted(ctx: Context, answered: dict[tuple[int, int, int], np.ndarray],
              target: tuple[int, int, int], after: int) -> int | None:
    """The index row of the first connection to ``target`` answered after frame ``after``."""
    rows = answered.get(target)
    if rows is None:
        return None
    later = rows[ctx.conns.index.take("response_frame", rows) > after]
    return int(later[0]) if len(later) else None


@rule("seqpacket-refused", Severity.ERROR, "SEQPACKET REQUEST refused by RST",
      after=("cid-mismatch", "state-lost", "accept-queue-full"))
def seqpacket_refused(ctx: Context) -> None:
    """Refused SEQPACKET REQUESTs, one finding per target: the port listens for STREAM only,
    or the peer cannot do SEQPACKET."""
    answered = _answered(ctx)
    for group in _refused(ctx, seqpacket=True):
        _seqpacket_refused(ctx, answered, group)


def _seqpacket_refused(ctx: Context, answered: dict[tuple[int, int, int], np.ndarray],
                       group: _Refused) -> None:
    first, frames, target, times = group.first, group.frames, group.target, group.times
    delay, common = group.max_delay, group.evidence()
    cid, port = first.server.cid, first.server.port
    stream_ok = _accepted(ctx, answered, (cid, port, SockType.STREAM), after=0)
    message = (f"The SEQPACKET REQUEST from {first.client.addr} to {target} (frame "
               f"{first.request_frame}) was refused{times} by an RST within "
               f"{delay_text(delay)}.")
    if stream_ok is not None:
        message += (f" A STREAM connection to the same port was accepted (stream "
                    f"{ctx.conns.index.take('stream', stream_ok)}): the service listens for "
                    f"STREAM only.")
        cause = ("The listener on that port is a SOCK_STREAM socket; Linux refuses a "
                 "SEQPACKET REQUEST to a socket of another type.")
        fix = "Connect with SOCK_STREAM, or make the service listen with SOCK_SEQPACKET."
    else:
        cause = ("Either nothing listens there for SEQPACKET, or the peer's transport does not "
                 "support SEQPACKET at all (Linux before 5.14, or a VMM's vsock device "
                 "without it).")
        fix = ("Check that a SOCK_SEQPACKET service listens on that port; if the peer cannot do "
               "SEQPACKET, use SOCK_STREAM with your own message framing, or upgrade the peer.")
    ctx.add(first, frames, message, cause, fix, **common)


@rule("no-transport", Severity.ERROR, "REQUEST never answered: the peer's vsock transport "
      "is not running", kinds=("no-transport", "peer-silent"),
      after=("cid-mismatch", "state-lost"))
def no_transport(ctx: Context) -> None:
    """no-transport: REQUESTs that got neither RESPONSE nor RST in time (those cid-mismatch
    or state-lost explains left out)."""
    ix = ctx.conns.index
    rows = np.flatnonzero(ix.closed(Close.UNANSWERED) & present(ix.request_frame)
                          & ~ix.among(ctx.unestablished))
    for frame, c in zip(ix.take("request_frame", rows).tolist(), ctx.conns.pick(rows),
                        strict=True):
        asked = request_ts(c)
        waited = (ctx.end_ns - asked) / 1e9
        if waited < ctx.t.no_transport_s:
            continue
        ctx.open_end_explained.add(c.stream)
        cid = c.server.cid
        spoke = ctx.digest.cid_first.get(cid)
        common: dict[str, Any] = dict(time_ns=asked, waited_s=round(waited, 3),
                                      dialled=c.server.addr)
        if spoke is None or spoke[1] >= asked:
            ctx.add(c, [frame],
                    f"The REQUEST from {c.client.addr} to {c.server.addr} (frame "
                    f"{c.request_frame}) got neither RESPONSE nor RST for "
                    f"{seconds_text(waited)}, and CID {cid} sent nothing earlier in the "
                    f"capture.",
                    *_no_transport_text(cid),
                    kind="no-transport", **common)
        else:
            ctx.add(c, [frame, spoke[0]],
                    f"The REQUEST from {c.client.addr} to {c.server.addr} (frame "
                    f"{c.request_frame}) got neither RESPONSE nor RST for {seconds_text(waited)}, "
                    f"although CID {cid} had sent packets before (first at frame {spoke[0]}).",
                    f"CID {cid}'s vsock stack stopped answering: the guest hung, or its "
                    f"transmit queue stalled (seen after a snapshot restore).",
                    "Check the peer's kernel log; after a restore, re-initialise the vsock "
                    "device (or reboot the guest) and reconnect.",
                    kind="peer-silent", severity=Severity.WARNING,
                    cid_first_frame=spoke[0], **common)


def _no_transport_text(cid: int) -> tuple[str, str]:
    """Cause and fix of an unanswered REQUEST, for the host or for a guest."""
    if cid == HOST_CID:
        return ("Nothing answers for the host (CID 2): the host end of the vsock device is not "
                "running — vhost_vsock not loaded, or a user-space VMM device (Firecracker, "
                "Cloud Hypervisor, libkrun) whose vsock backend is stopped or stuck.",
                "Load vhost_vsock on the host, or start (or restart) the VMM's vsock backend; "
                "give connect() a timeout and report its failure.")
    return (f"No vsock transport answers at CID {cid}: the guest's virtio-vsock driver "
            f"(vmw_vsock_virtio_transport) is not loaded, the guest is still booting, or no VM "
            f"has that CID.",
            "Load the transport in the guest and wait for it to boot before dialling; give "
            "connect() a timeout longer than the boot.")


@rule("dial-retry", Severity.WARNING, "repeated REQUESTs to a failing CID:port",
      after=("accept-queue-full",))
def dial_retry(ctx: Context) -> None:
    """Runs of failing attempts to one CID:port, each soon after the last. Refusals of a
    full accept queue are left out: a burst of parallel clients looks like a retry loop."""
    ix = ctx.conns.index
    failed = _failed(ix)
    gap = ctx.t.retry_gap_s
    groups = ix.groups(np.flatnonzero(present(ix.request_frame) & ~ix.among(ctx.queue_refused)),
                       (ix.client_cid, ix.server_cid, ix.server_port, ix.type),
                       least=max(ctx.t.retry_count, 1))
    for attempts in groups:
        # an attempt joins the run of the one before when that failed and it came soon
        ts = ix.take("first_ts", attempts)  # request_ts: a REQUEST is its stream's first packet
        joins = failed[attempts[:-1]] & ((ts[1:] - ts[:-1]) / 1e9 <= gap)
        bounds = np.r_[0, np.flatnonzero(~joins) + 1, len(attempts)]
        del ts, joins  # a storm's million: let go before its findings are made
        long = np.flatnonzero(np.diff(bounds) >= ctx.t.retry_count)  # no array per short run
        for a, b in zip(bounds[long].tolist(), bounds[long + 1].tolist(), strict=True):
            _report_retry(ctx, attempts[a:b], failed)


def _failed(ix: Index) -> np.ndarray:
    """Which connections are a connect() that failed: refused or unanswered, or reset
    before any RESPONSE."""
    return ix.closed(*FAILED) | (present(ix.request_frame) & ~present(ix.response_frame)
                                 & ix.closed(Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER))


def _report_retry(ctx: Context, run: np.ndarray, failed: np.ndarray) -> None:
    ix = ctx.conns.index
    first, last = ctx.conns.at(int(run[0])), ctx.conns.at(int(run[-1]))
    span = (request_ts(last) - request_ts(first)) / 1e9
    connected = not failed[run[-1]] and last.response_frame is not None
    failures = run[:-1] if connected else run
    how = sorted({str(CLOSES[k]) for k in np.unique(ix.take("close", failures)).tolist()})
    outcome = (f"the attempt at frame {last.request_frame} connected" if connected
               else "none connected")
    frames = ix.take("request_frame", run)
    frames = frames[frames != 0]
    ctx.add(first, frames,
            f"CID {first.client.cid} dialled {first.server.addr} {len(run)} times in "
            f"{seconds_text(span)} ({len(failures)} {'/'.join(how)}); {outcome}.",
            "The client retries a failing connect(). To its user a refusal (nothing listens) "
            "then looks like a slow timeout, and the real error is never shown.",
            "Log the connect() error of every attempt; wait for the service's readiness instead "
            "of retrying blindly; fix the target (see the no-listener / no-transport findings).",
            streams=ix.take("stream", run), time_ns=request_ts(first), attempts=len(run),
            failures=len(failures), span_s=round(span, 3), connected=connected)


@rule("state-lost", Severity.ERROR, "REQUEST on an address pair that is still connected")
def state_lost(ctx: Context) -> None:
    """A REQUEST reusing the address pair of a connection that never closed."""
    ix = ctx.conns.index
    prev = ix.previous_same_pair()
    older = np.maximum(prev, 0)
    reused = ((prev >= 0) & present(ix.request_frame)
              & np.isin(ix.take("close", older), _OPEN_CODES))
    reused &= ~(ix.closed(Close.UNANSWERED)[older]
                | (ix.take("start_seen", older) & ~present(ix.take("response_frame", older))))
    rows = np.flatnonzero(reused)
    olds = prev[rows]
    found = zip(ix.take("stream", olds).tolist(), ix.take("last_frame", olds).tolist(),
                olds.tolist(), ix.take("request_frame", rows).tolist(), ctx.conns.pick(rows),
                strict=True)
    for old_stream, old_last, old_row, request_frame, c in found:
        old = _Old(old_stream, old_last, ix.close_of(old_row))
        ctx.open_end_explained.add(old.stream)
        ctx.unestablished.add(c.stream)
        ctx.add(c, [old.last_frame, request_frame],
                f"A REQUEST (frame {c.request_frame}) reuses the address pair of stream "
                f"{old.stream}, which was still connected ({old.close}, last packet at frame "
                f"{old.last_frame}, no RST).",
                "One end lost the connection's state while the other kept it: typical after a "
                "VM snapshot restore or live migration, or a VMM bug; the old connection will "
                "never be closed properly.",
                "After a resume or restore, close the old sockets and reconnect; check the "
                "VMM's vsock handling of snapshots.",
                streams=[c.stream, old.stream], time_ns=request_ts(c),
                previous_stream=old.stream)
