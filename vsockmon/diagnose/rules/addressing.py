"""Rules about addresses: packets between CIDs that cannot talk, answers from another CID."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from vsockmon.diagnose.connections import present
from vsockmon.diagnose.digest import EXAMPLE_FRAMES, Count
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.wire.protocol import Op


@rule("cid-mismatch", Severity.ERROR, "packets between CIDs the host drops, or an answer "
      "from another CID", kinds=("not-host", "reply-cid"))
def cid_mismatch(ctx: Context) -> None:
    """cid-mismatch: packets between CIDs that cannot talk (one finding per CID pair), and
    answers from another CID than the one dialled."""
    pairs: dict[tuple[int, ...], list[tuple[int, Count]]] = defaultdict(list)
    for sid, count in sorted(ctx.digest.bad_cids.items()):
        pairs[count.detail].append((sid, count))
    for (src, dst), found in pairs.items():
        sid, first = found[0]
        packets = sum(count.count for _, count in found)
        ctx.open_end_explained.update(s for s, _ in found)
        ctx.unestablished.update(s for s, _ in found)  # dropped: nothing can answer
        ctx.add(ctx.conns[sid],
                [f for _, count in found for f in count.frames][:EXAMPLE_FRAMES],
                f"{packets} packet(s) from CID {src} to CID {dst} (first at frame "
                f"{first.frames[0]}, {len(found)} connection(s)): no transport carries traffic "
                f"between these CIDs, so nothing ever answers.",
                "A guest can reach only the host (CID 2) and itself. The host's vhost-vsock "
                "taps such a packet before checking its addresses, then drops it, so the "
                "sender waits for an answer that never comes. Usual causes: a CID baked into a "
                "VM template or snapshot, two VMs with one CID, or CID 1 used to mean the host.",
                "Dial CID 2 (VMADDR_CID_HOST) from a guest; give every VM its own CID and check "
                "the guest's own CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID).",
                kind="not-host", streams=[s for s, _ in found], time_ns=first.first_ns,
                packets=packets, src_cid=src, dst_cid=dst)
    _reply_from_other_cid(ctx)


def _reply_from_other_cid(ctx: Context) -> None:
    """An unanswered REQUEST whose answer came back on the same ports from another CID."""
    ix = ctx.conns.index
    answers = [c for c in ctx.conns.pick(np.flatnonzero(~ix.start_seen))
               if c.events and c.events[0].op in (Op.RESPONSE, Op.RST)]
    if not answers:
        return
    unanswered = np.flatnonzero(present(ix.request_frame) & ~present(ix.response_frame)
                                & np.isin(ix.client_port, [c.client.port for c in answers]))
    pending = {key: row for row, key in zip(unanswered.tolist(), zip(
        *(ix.take(k, unanswered).tolist() for k in ("client_cid", "client_port", "server_port")),
        strict=True), strict=True)}
    for c in answers:
        row = pending.get((c.client.cid, c.client.port, c.server.port))
        if row is None or int(ix.take("server_cid", row)) == c.server.cid:
            continue
        asked = ctx.conns.at(row)
        ctx.open_end_explained.update((asked.stream, c.stream))
        ctx.unestablished.add(asked.stream)
        ctx.add(asked, [asked.request_frame or asked.first_frame, c.first_frame],
                f"The REQUEST went to CID {asked.server.cid} (frame {asked.request_frame}), but "
                f"the answer came from CID {c.server.cid} on the same ports (frame "
                f"{c.first_frame}, stream {c.stream}).",
                f"The peer believes it is CID {c.server.cid}, not the CID {asked.server.cid} "
                f"it was dialled at: a stale CID after a snapshot restore or from a template.",
                "Give the VM the CID its peers dial (or dial the CID it reports), and restart "
                "its vsock users after changing a CID.",
                kind="reply-cid", streams=[asked.stream, c.stream],
                dialled_cid=asked.server.cid, answering_cid=c.server.cid)
