"""``vsockmon capture``: tcpdump for vsockmon links (creates and removes vsockmon0 for you)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import click

from vsockmon.live import bpf
from vsockmon.live.capture import (
    DEFAULT_BUFFER,
    CaptureStats,
    FileSink,
    LineSink,
    LiveCapture,
    LiveCaptureError,
    capture_mode,
    drop_privileges,
    fork_unprivileged,
    live_capture,
    run,
)
from vsockmon.live.link import DEFAULT_LINK, HeldLink, LinkError, Terminated
from vsockmon.wire.protocol import Op, SockType

LOSS_EXIT = 3
"""Exit status of a capture that ended normally but misses frames the kernel saw."""


def _filter(cid: tuple[str, ...], port: tuple[str, ...], types: tuple[str, ...],
            ops: tuple[str, ...], snaplen: int) -> bpf.FrameFilter:
    try:
        flt = bpf.FrameFilter(
            cids=bpf.parse_cids(cid), ports=bpf.parse_ints(port, "port"),
            types=bpf.parse_enum(types, SockType), ops=bpf.parse_enum(ops, Op),
            snaplen=snaplen or bpf.DEFAULT_SNAPLEN)
        flt.bytecode()  # compiles now: a filter too long fails before the link is touched
    except bpf.BpfFilterError as e:
        raise click.UsageError(str(e)) from None
    return flt


def _status_printer(quiet: bool):  # type: ignore[no-untyped-def]
    if quiet or not sys.stderr.isatty():
        return None

    def show(stats: CaptureStats) -> None:
        sys.stderr.write("\r\x1b[K" + stats.line())
        sys.stderr.flush()

    return show


def _parse_umask(_ctx: click.Context, _param: click.Parameter, value: str | None
                 ) -> int | None:
    """``--umask 022`` → 0o022 (always octal, as the shell's umask)."""
    if value is None:
        return None
    try:
        umask = int(value, 8)
    except ValueError:
        umask = -1
    if not 0 <= umask <= 0o777:
        raise click.BadParameter(f"{value!r} is not an octal umask (000 to 777)")
    return umask


@click.command()
@click.option("-i", "--interface", "ifname", default=DEFAULT_LINK, show_default=True,
              help="vsockmon link to capture on; created (and removed on exit) if missing.")
@click.option("-w", "--write", "path", metavar="FILE",
              help="Write frames to FILE: pcapng for .pcapng, else pcap; '-' for stdout. "
                   "Without it, print one line per frame.")
@click.option("-c", "--count", type=click.IntRange(min=1), help="Stop after N frames.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this many seconds.")
@click.option("--ring", "ring_files", type=click.IntRange(min=1), metavar="N",
              help="Keep at most N files FILE.0 … FILE.N-1, overwriting the oldest "
                   "(tcpdump -W); needs --ring-size.")
@click.option("--ring-size", type=click.FloatRange(min=0, min_open=True), metavar="MB",
              help="Start a new file FILE.K when the current one reaches MB million bytes "
                   "(tcpdump -C).")
@click.option("-s", "--snaplen", type=click.IntRange(min=0), default=0,
              help="Keep at most this many bytes of each frame (0: all).")
@click.option("--cid", multiple=True, metavar="CID",
              help="Only frames from or to this CID: a number or host, local, hypervisor "
                   "(repeat or comma-separate for any of).")
@click.option("--port", multiple=True, metavar="PORT", help="Only frames from or to this port.")
@click.option("--type", "types", multiple=True, metavar="TYPE",
              help="Only this socket type: stream, seqpacket.")
@click.option("--op", "ops", multiple=True, metavar="OP",
              help="Only these ops: request, response, rst, shutdown, rw, credit_update, "
                   "credit_request.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.option("-Z", "--user", metavar="USER",
              help="Drop privileges to USER once the socket is open (files are created as "
                   "USER).")
@click.option("--umask", type=click.UNPROCESSED, callback=_parse_umask, metavar="OCTAL",
              help="Create the files with mode 0666 less this umask (022: 0644) instead of "
                   "0600, the default: payloads can hold secrets.")
@click.option("-B", "--buffer-size", "buffer_mb", type=click.IntRange(min=2),
              default=DEFAULT_BUFFER >> 20,
              show_default=True, help="Kernel capture buffer (ring) in MiB.")
@click.option("--no-mmap", is_flag=True,
              help="Read with batched recvmsg instead of the TPACKET_V3 mmap ring.")
@click.option("-q", "--quiet", is_flag=True, help="No status line and no summary.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the final statistics as one JSON object on stderr.")
@click.option("--diagnose", is_flag=True,
              help="Report problems live on stderr as they become certain (the rules of "
                   "'vsockmon diagnose', docs/diagnose.md).")
def capture(ifname: str, path: str | None, count: int | None, duration: float | None,
            ring_files: int | None, ring_size: float | None, snaplen: int,
            cid: tuple[str, ...], port: tuple[str, ...], types: tuple[str, ...],
            ops: tuple[str, ...], force: bool, user: str | None, umask: int | None,
            buffer_mb: int,
            no_mmap: bool, quiet: bool, as_json: bool, diagnose: bool) -> None:
    """Capture vsock traffic from a vsockmon link, like tcpdump.

    Needs CAP_NET_ADMIN (to create the link) and CAP_NET_RAW (to read it): run as root.
    Files are created mode 0600 (payloads can hold secrets; --umask for others), owned by
    -Z USER when given.
    The link is removed on exit, on Ctrl-C and on SIGTERM when this command created it.
    A 'listening on' line on stderr says when frames are being captured.

    \b
    Examples:
      vsockmon capture                                  # one line per frame
      vsockmon capture -w t.pcap -c 1000
      vsockmon capture -w - | wireshark -k -i -
      vsockmon capture --cid 3 --port 1024 --op rw -w agent.pcapng
      vsockmon capture -w ring.pcap --ring 5 --ring-size 100
      vsockmon capture -w t.pcap --diagnose
      vsockmon capture -w shared.pcap --umask 022      # mode 0644, not 0600
    """
    frame_filter = _filter(cid, port, types, ops, snaplen)
    if (ring_files or ring_size) and not path:
        raise click.UsageError("--ring and --ring-size need -w FILE")
    rotate = int(ring_size * 1_000_000) if ring_size else None
    try:
        # Check the output before touching the link: refusing to overwrite changes nothing.
        sink_args = dict(path=path, force=force, snaplen=frame_filter.snaplen,
                         rotate_bytes=rotate, files=ring_files, mode=capture_mode(umask))
        if path:
            FileSink.check(**sink_args)  # type: ignore[arg-type]
        with live_capture(ifname, frame_filter, buffer_mb << 20, not no_mmap) as (held, live):
            if user is not None and (held.created or held.raised):
                code = fork_unprivileged(user)
                if code is not None:  # the parent: the child captured; the link goes now
                    if code:
                        sys.exit(code)
                    return
                _child(live, held, sink_args, count, duration, quiet, as_json, diagnose)
            if user is not None:
                drop_privileges(user)
            _capture(live, held, sink_args, count, duration, quiet, as_json, diagnose)
    except (LiveCaptureError, LinkError) as e:
        raise click.ClickException(str(e)) from None
    except Terminated:
        sys.exit(143)


def _child(live: LiveCapture, held: HeldLink, sink_args: Mapping[str, object],
           count: int | None, duration: float | None, quiet: bool, as_json: bool,
           diagnose: bool) -> None:
    """The unprivileged child of ``-Z``: capture, then leave without running the parent's
    cleanup (the parent removes the link)."""
    code = 1
    try:
        _capture(live, held, sink_args, count, duration, quiet, as_json, diagnose)
        code = 0
    except SystemExit as e:  # a capture that lost frames
        code = e.code if isinstance(e.code, int) else 1
    except LiveCaptureError as e:
        click.echo(f"Error: {e}", err=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _capture(live: LiveCapture, held: HeldLink, sink_args: Mapping[str, object],
             count: int | None, duration: float | None, quiet: bool, as_json: bool,
             diagnose: bool = False) -> None:
    path = sink_args["path"]
    sink: Any = FileSink(**sink_args) if path else LineSink(sys.stdout)  # type: ignore[arg-type]
    files = sink
    live.record_format = getattr(sink, "record_format", live.record_format)
    if diagnose:  # imported here: the plain capture path stays free of numpy
        from vsockmon.cli.diagnose import LiveReport

        sink = LiveReport(sink)
    stats = CaptureStats()
    if duration is not None:  # counted from the summary's own start: its seconds >= duration
        live.deadline = stats.started + duration
    origin = "created; removed on exit" if held.created else "existing"
    target = f", writing {path}" if path else ""
    click.echo(f"listening on {live.ifname} ({origin}), {live.filter.describe()}, "
               f"{live.method}{target}", err=True)
    printer = _status_printer(quiet or not path)
    if diagnose:  # findings that time alone makes certain need a tick while idle
        status = printer

        def printer(st: CaptureStats) -> None:
            sink.tick()
            if status is not None:
                status(st)

    try:
        reason = run(live, sink, stats, count, printer)
    finally:
        sink.close()
    if as_json:
        click.echo(json.dumps({**stats.as_dict(), "stopped": reason,
                               "files": getattr(sink, "written", [])}), err=True)
    elif not quiet:
        clear = "\r\x1b[K" if printer else ""
        click.echo(f"{clear}{stats.line()} [stopped: {reason}]", err=True)
    for name in getattr(files, "deleted", []):
        click.echo(f"warning: {name} was deleted during the capture: the packets written "
                   "to it are gone with it", err=True)
    warning = stats.loss_line()
    if warning is not None:  # even with -q: a capture that misses frames never looks whole
        click.echo(warning, err=True)
        sys.exit(LOSS_EXIT)
