"""``vsockmon echo server|client``: vsock traffic that verifies itself and measures."""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from vsockmon.live.echo import (
    DEFAULT_BACKLOG,
    THREAD_STACK,
    TYPES,
    ClientOptions,
    EchoError,
    EchoServer,
    addr_text,
    format_report,
    run_client,
)
from vsockmon.wire.protocol import VMADDR_CID_ANY, parse_cid

_TYPE = click.Choice(sorted(TYPES), case_sensitive=False)


@click.group()
def echo() -> None:
    """Echo server and measuring client over vsock (STREAM, SEQPACKET, DGRAM).

    \b
    Examples:
      vsockmon echo server --port 9999
      vsockmon echo server --port 9999 -v        # print what each client sends
      vsockmon echo client --cid 1 --port 9999 --count 50 --size 100 --json
      vsockmon echo client --cid 3 --port 9999 --size 65536 --duration 10 --concurrency 4
      vsockmon echo server --port 9999 --buffer-size 4096 --read-delay 0.01   # credit stalls
      vsockmon echo client --cid 1 --port 9999 --concurrency 1000 --count 3   # load
    """


class _Cid(click.ParamType):
    """A CID as everywhere else in vsockmon: a number or a reserved CID's name."""

    name = "cid"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_cid(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@echo.command()
@click.option("--port", type=click.IntRange(0, 0xFFFFFFFE), default=9999, show_default=True)
@click.option("--cid", type=_Cid(), default=VMADDR_CID_ANY,
              help="Local CID to bind: a number, or local, host (default: any).")
@click.option("--type", "kind", type=_TYPE, default="stream", show_default=True)
@click.option("--buffer-size", type=click.IntRange(min=1), metavar="BYTES",
              help="Receive buffer of each connection (SO_VM_SOCKETS_BUFFER_SIZE): the "
                   "buf_alloc peers see. Small values provoke credit stalls.")
@click.option("--read-delay", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Sleep before every read, so the window fills (credit stalls).")
@click.option("--backlog", type=click.IntRange(min=0), default=DEFAULT_BACKLOG,
              show_default=True,
              help="Accept queue length (listen's backlog; the kernel caps it at "
                   "net.core.somaxconn). When it is full the kernel refuses new connections "
                   "with RST, exactly as if nothing listened.")
@click.option("-v", "--verbose", is_flag=True,
              help="On stderr: the bytes of every read (as Python prints bytes, the first 64) "
                   "and how each connection ended.")
@click.option("--json", "as_json", is_flag=True,
              help="Also print the final counts as JSON on stdout, with one entry per "
                   "connection (peer, received, echoed, reads, end).")
def server(port: int, cid: int, kind: str, buffer_size: int | None, read_delay: float,
           backlog: int, verbose: bool, as_json: bool) -> None:
    """Echo everything back to any number of clients until Ctrl-C or SIGTERM.

    A 'listening on' line on stderr says when clients may connect. Bytes count as
    received when they are read, so a client that sends and closes without reading its
    echo is counted; only a reset before a client sent anything counts as abrupt.
    Each client gets its own thread the moment it is accepted: 1,000 at once are served.

    \b
    Examples:
      vsockmon echo server --port 9999
      vsockmon echo server --port 9999 --backlog 1    # provoke accept-queue overflows
    """
    log = _log if verbose else None
    threading.stack_size(THREAD_STACK)
    try:
        srv = EchoServer(port, kind.lower(), cid, buffer_size, read_delay, log=log,
                         backlog=backlog)
    except EchoError as e:
        raise click.ClickException(str(e)) from None
    # Explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupt)
    click.echo(f"listening on vsock {addr_text(cid, srv.port)} ({kind.lower()})", err=True)
    try:
        srv.serve()
    except KeyboardInterrupt:
        pass
    except EchoError as e:
        raise click.ClickException(str(e)) from None
    finally:
        srv.close()
    stats = srv.stats.as_dict()
    if as_json:
        click.echo(json.dumps(stats))
    click.echo(f"served {stats['connections']} connections, {stats['messages']} reads, "
               f"{stats['bytes']} bytes received, {stats['echoed']} echoed, "
               f"{stats['resets']} ended abruptly", err=True)


def _log(line: str) -> None:
    click.echo(line, err=True)


@echo.command()
@click.option("--cid", type=_Cid(), required=True,
              help="Peer CID: 1 or local (loopback), 2 or host, 3+ guests.")
@click.option("--port", type=click.IntRange(0, 0xFFFFFFFE), default=9999, show_default=True)
@click.option("--type", "kind", type=_TYPE, default="stream", show_default=True)
@click.option("--count", type=click.IntRange(min=1),
              help="Messages in total, spread over the connections (default 10 unless "
                   "--duration).")
@click.option("--size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Bytes per message.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Connections at once.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Send for this long (with --count: whichever ends first).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), metavar="MSGS/S",
              help="Pace messages to this rate over all connections.")
@click.option("--buffer-size", type=click.IntRange(min=1), metavar="BYTES",
              help="Receive buffer per connection (SO_VM_SOCKETS_BUFFER_SIZE).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds to wait for a connect or an echo.")
@click.option("--eor", is_flag=True, help="SEQPACKET: send each message with MSG_EOR.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def client(cid: int, port: int, kind: str, count: int | None, size: int, concurrency: int,
           duration: float | None, rate: float | None, buffer_size: int | None,
           timeout: float, eor: bool, as_json: bool) -> None:
    """Send messages, verify every echoed byte, report MB/s, msgs/s and latency p50/p99.

    Exits non-zero when a byte came back wrong or a connection failed; failures are
    counted per distinct error (in --json: "errors", a list of {"error", "count"}).

    \b
    Examples:
      vsockmon echo client --cid 1 --port 9999 --count 50 --size 100 --json
      vsockmon echo client --cid 1 --port 9999 --concurrency 1000 --count 3
    """
    opts = ClientOptions(cid, port, kind.lower(), count, size, concurrency, duration, rate,
                         buffer_size, timeout, eor)
    threading.stack_size(THREAD_STACK)
    try:
        report = run_client(opts)
    except EchoError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    errors = report.errors
    if not as_json and report.messages == 0 and len(errors) == 1:  # one cause: one line
        text, n = next(iter(errors.items()))
        raise click.ClickException(text if n == 1 else f"{text} (all {n} connections)")
    click.echo(json.dumps(report.as_dict()) if as_json else format_report(report))
    if not report.ok:
        sys.exit(1)
