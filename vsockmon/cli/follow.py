"""``vsockmon follow``: the reassembled bytes of one connection, each direction in order."""

from __future__ import annotations

import sys

import click

from vsockmon.analysis import reassembly as ra
from vsockmon.cli.reading import scan
from vsockmon.conntrack.tracker import StreamRows
from vsockmon.decode.render import hexdump
from vsockmon.wire.protocol import SockType

ARROWS = ("client→server", "server→client")


@click.command()
@click.argument("file", metavar="FILE")
@click.option("--conn", "stream", type=click.IntRange(min=0), required=True, metavar="N",
              help="The stream to follow (see vsockmon conns).")
@click.option("--hex", "as_hex", is_flag=True, help="Hex dump instead of text.")
@click.option("--raw", is_flag=True,
              help="Write one direction's bytes, unchanged, to stdout (needs --dir).")
@click.option("--dir", "direction", type=click.Choice(sorted(ra.DIRECTIONS)),
              help="Only this direction: c2s (client→server) or s2c.")
def follow(file: str, stream: int, as_hex: bool, raw: bool, direction: str | None) -> None:
    """Print the bytes of one connection as its ends sent them, in order.

    Each packet counts with the first `len` bytes of its payload (the virtio header's
    length, whatever the tap captured after it). SEQPACKET messages are shown one by one,
    ended by EOM.

    \b
    Examples:
      vsockmon follow capture.pcap --conn 0
      vsockmon follow capture.pcap --conn 2 --hex --dir s2c
      vsockmon follow capture.pcap --conn 0 --raw --dir c2s > request.bin
    """
    if raw and not direction:
        raise click.UsageError("--raw needs --dir c2s or --dir s2c")
    if raw and as_hex:
        raise click.UsageError("choose one of --raw and --hex")
    if raw and sys.stdout.isatty():  # a payload's escape sequences would drive the terminal
        raise click.UsageError("--raw writes the bytes unchanged: redirect them to a file or "
                               "a pipe, or use --hex to see them")
    rows = StreamRows([stream], payloads=True)
    analysis = scan(file, rows)
    held = len(analysis.tracker)  # counted, not made: a capture may hold a million
    if stream >= held:
        raise click.ClickException(f"{analysis.name}: no stream {stream} "
                                   f"({held} in this capture)")
    conn = analysis.connection(stream)
    parts = ra.chunks(rows.columns(stream), rows.payload(stream))
    only = ra.DIRECTIONS[direction] if direction else None
    if raw:
        assert only is not None
        data, missing = ra.direction_bytes(parts, only)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        if missing:
            click.echo(f"vsockmon: warning: {missing} bytes were not captured "
                       "(snap length); the output has gaps", err=True)
        return
    seq = conn.type == SockType.SEQPACKET
    click.echo(f"stream {stream}  {conn.type_name}  client {conn.client.addr}  "
               f"server {conn.server.addr}  {conn.client.bytes} bytes client→server, "
               f"{conn.server.bytes} bytes server→client")
    for number, seg in enumerate(ra.segments(parts, seq)):
        if only is not None and seg.sender != only:
            continue
        click.echo(_header(seg, seq, number))
        data = bytes(seg.data)
        body = hexdump(data, None, 8) if as_hex else [ra.printable(data)]
        click.echo("\n".join(body))
    sys.stdout.flush()


def _header(seg: ra.Segment, seq: bool, number: int) -> str:
    frames = f"frame {seg.frames[0]}" if len(seg.frames) == 1 \
        else f"frames {seg.frames[0]}-{seg.frames[-1]}"
    what = f"{'message' if seq else 'segment'} {number}"
    notes = [frames, f"{len(seg.data)} bytes"]
    if seq:
        notes.append("EOR" if seg.eor else "" if seg.complete else "no EOM before the end")
    if seg.missing:
        notes.append(f"{seg.missing} bytes not captured")
    return f"=== {ARROWS[seg.sender]} {what} ({', '.join(n for n in notes if n)})"
