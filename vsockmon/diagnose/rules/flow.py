"""Rules about flow control: credit ignored, or exhausted by per-packet overhead (full
windows are :mod:`vsockmon.diagnose.rules.stall`'s)."""

from __future__ import annotations

import numpy as np

from vsockmon.conntrack.tracker import Close, Violation
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule


@rule("credit-violation", Severity.ERROR, "RW beyond the advertised credit")
def credit_violation(ctx: Context) -> None:
    """Senders that ignored the peer's advertised credit."""
    for (sid, d), e in sorted(ctx.digest.beyond.items()):
        c = ctx.conns[sid]
        sender, receiver = c.sides[d], c.sides[1 - d]
        ev = sender.violations.get(Violation.BEYOND_CREDIT)
        count = ev.count if ev else e.count
        ctx.add(c, [e.first_frame, e.last_frame],
                f"{sender.role} {sender.addr} sent {count} RW packet(s) beyond the credit "
                f"{receiver.addr} advertised: the first at frame {e.first_frame} carried "
                f"{e.length} bytes with {max(e.credit, 0)} bytes of credit left; at worst "
                f"{e.max_in_flight} bytes were in flight for a {e.limit}-byte buffer.",
                "The sender ignores flow control: it must keep the bytes in flight within the "
                "peer's buf_alloc minus what the peer has not consumed (fwd_cnt). A transport "
                "bug; the receiver may drop the excess or reset.",
                "Fix the sender's vsock implementation (VMM device, driver or user-space "
                "stack) to honour buf_alloc and fwd_cnt.",
                time_ns=e.first_ns, packets=count, first_len=e.length,
                credit_before=e.credit, max_in_flight=e.max_in_flight, buf_alloc=e.limit)


@rule("small-packet-reset", Severity.ERROR, "reset after many small writes while credit "
      "remained")
def small_packet_reset(ctx: Context) -> None:
    """Resets after many small writes while byte credit remained (per-packet overhead)."""
    ix = ctx.conns.index
    reset = ix.closed(Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER)
    for c in ctx.conns.pick(np.flatnonzero(reset & ix.among(ctx.digest.resets))):
        rst = ctx.digest.resets.get(c.stream)
        if rst is None:
            continue
        d = 1 - rst.sender
        small = ctx.digest.small_rw.get((c.stream, d), 0)
        credit = rst.limit[d] - rst.in_flight[d]
        if small < ctx.t.small_rw_count or rst.limit[d] < 0 or credit <= 0:
            continue
        sender, receiver = c.sides[d], c.sides[rst.sender]
        ctx.reset_explained.add(c.stream)
        ctx.add(c, [rst.frame],
                f"{receiver.addr} reset the connection (frame {rst.frame}) after {small} RW "
                f"packets under {ctx.t.small_rw_bytes} bytes from {sender.addr}, while the "
                f"sender still had {credit} of {rst.limit[d]} bytes of credit.",
                "The receiver charges per-packet overhead against its buffer: many small "
                "packets used it up long before the byte credit ran out, so it dropped data "
                "(ENOBUFS) and reset the connection (e.g. libkrun #795).",
                "Raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver and coalesce small writes "
                "(buffer them, write larger chunks).",
                time_ns=rst.ts_ns, small_writes=small, credit_left=credit,
                buf_alloc=rst.limit[d])
