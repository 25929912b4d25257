"""The payload dissectors' short cuts (``decode`` runs them on every RW payload): each must
answer exactly what the full rule it skips would answer.

The full rules are written out here as the documented definitions (docs/payload.md), and
compared with the dissectors over a corpus built to reach every short cut's edge: every
first byte, white space before a first line (ASCII and Unicode), ttrpc headers cut at every
length, and random bytes.
"""

from __future__ import annotations

import random

from vsockmon.payload import REGISTRY, PayloadDissector, PayloadInfo, Registry, http, text, ttrpc


def _text_of(payload: bytes) -> str | None:
    """Text by its definition: UTF-8 without control characters other than tab, CR, LF."""
    try:
        s = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any((ord(c) < 32 and c not in "\t\n\r") or c == "\x7f" for c in s):
        return None
    return s


def _text_ok(payload: bytes) -> bool:
    s = _text_of(payload)
    return s is not None and bool(s.strip())


def _lines_ok(payload: bytes) -> bool:
    """sd_notify by its definition: text, and every line that is not blank is KEY=VALUE
    with an upper-case key."""
    s = _text_of(payload)
    if s is None:
        return False
    lines = [line.rstrip("\r") for line in s.split("\n") if line.strip()]
    return bool(lines) and all(text._ASSIGNMENT.fullmatch(line) for line in lines)


def _http_ok(payload: bytes) -> bool:
    """http by its definition: the first line is a request or a status line."""
    line = payload.split(b"\n", 1)[0].rstrip(b"\r")
    return bool(http._REQUEST.fullmatch(line) or http._RESPONSE.fullmatch(line))


def _ttrpc_ok(payload: bytes) -> bool:
    """ttrpc by its definition: whole messages with known types that tile the payload,
    each request naming a service."""
    pos, seen = 0, False
    while pos < len(payload):
        if len(payload) - pos < ttrpc.HEADER_LEN:
            return False
        length, _, kind, _ = ttrpc.HEADER.unpack_from(payload, pos)
        end = pos + ttrpc.HEADER_LEN + length
        if length > ttrpc.MAX_MESSAGE or kind not in (1, 2, 3) or end > len(payload):
            return False
        if kind == 1:
            try:
                if not ttrpc._request(payload[pos + ttrpc.HEADER_LEN : end])[0]:
                    return False
            except ValueError:
                return False
        pos, seen = end, True
    return seen


def _corpus() -> list[bytes]:
    rng = random.Random(12)
    bases = [
        b"READY=1\n", b"READY=1\nSTATUS=Serving\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n", b"HEAD /a HTTP/1.0\n\n", b"OPTIONS * HTTP/1.1\r\n",
        b'{"execute": "guest-ping"}\n', b"[1, 2]", b"hello\nworld\n", b"client 7 says hello\n",
        b"ET / HTTP/1.1\r\n", b"TTP/1.1 200 OK\r\n", b"EADY=1\n", b"\x00\x01\x02",
        ttrpc.encode_request(1, "grpc.Health", "Check"),
        ttrpc.encode_response(1, b"x", code=5, message="gone"),
        ttrpc.encode(3, ttrpc.MsgType.DATA, b"abc"),
        ttrpc.encode_request(2, "", "M"),  # a request naming no service
    ]
    bases += [f"{method} /x HTTP/1.1\r\n".encode() for method in
              ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")]
    out = list(bases)
    # every first byte in front of each base (and replacing its first byte)
    for base in bases:
        for b in range(256):
            out += [bytes([b]) + base, bytes([b]) + base[1:]]
    # white space before the first line that is not blank: ASCII and Unicode (NBSP, EM SPACE)
    for lead in ("\n", " \n", "\t\r\n", "\u00a0\n", "\u2003\n", "\u00a0", "\x1c\n", "\n\n"):
        out += [lead.encode() + b"READY=1\n", lead.encode() + b"ready=1\n"]
    # ttrpc: cut at every length, one byte more, two messages, header fields changed
    two = ttrpc.encode_request(1, "svc", "M") + ttrpc.encode(3, ttrpc.MsgType.DATA, b"zz")
    for msg in (two, bases[14], bases[15]):
        out += [msg[:n] for n in range(len(msg) + 1)] + [msg + b"x"]
        for pos in range(ttrpc.HEADER_LEN):
            for value in (0, 1, 2, 3, 4, 0x40, 0xFF):
                out.append(msg[:pos] + bytes([value]) + msg[pos + 1 :])
    out += [rng.randbytes(rng.randrange(1, 64)) for _ in range(3000)]
    out += [bytes(rng.choice(b"ABZ_=09 \t\r\nabz{}[]/:.GETHP\xc2\xa0\x1b\x7f\x00") for _ in
                  range(rng.randrange(1, 24))) for _ in range(3000)]
    # valid UTF-8 with and without a control character, invalid UTF-8 with one
    out += [b"caf\xc3\xa9\n", b"caf\xc3\xa9\x1b[2J", b"\xc3\x1b", b"\xff\x00text", b"\t\r\n"]
    return out


CORPUS = _corpus()


def test_detect_short_cuts_answer_as_the_full_rules() -> None:
    hits = {"sd_notify": 0, "http": 0, "ttrpc": 0, "text": 0}
    for p in CORPUS:
        want = (_lines_ok(p), _http_ok(p), _ttrpc_ok(p), _text_ok(p))
        got = (text.detect_sd_notify(p), http.detect(p), ttrpc.detect(p), text.detect_text(p))
        assert got == want, p
        for name, hit in zip(hits, want, strict=True):
            hits[name] += hit
    # the corpus reaches both answers of every rule, through its short cut's edges
    assert all(n > 20 for n in hits.values()), hits
    assert text.detect_sd_notify("\u00a0\nREADY=1\n".encode())  # a first byte above 127
    assert not text.detect_sd_notify(b"\x1c\nREADY=1\n")  # white space, but a control byte


def test_text_detection_decides_its_dissection() -> None:
    """The promise of ``detect_decides`` for the text dissector, that lets decode skip it."""
    assert text.TEXT.detect_decides
    claimed = 0
    for p in CORPUS:
        if text.detect_text(p):
            info = text.dissect_text(p)
            assert info is not None and info.protocol == "text", p
            claimed += 1
    assert claimed > 1000


def test_hiding_text_is_dissecting_and_dropping_text() -> None:
    seen = set()
    for i, p in enumerate(CORPUS):
        ports = (1024, 50000) if i % 3 == 0 else (50000, 7000)
        full = REGISTRY.dissect(p, *ports)
        hidden = REGISTRY.dissect(p, *ports, hide="text")
        want = None if full is None or full.protocol == "text" else full
        assert hidden == want, p
        seen.add(full.protocol if full else None)
    assert seen == {None, "text", "sd_notify", "http", "json", "ttrpc"}


def _counting(name: str, priority: int, decides: bool, claims: bytes,
              calls: list[str]) -> PayloadDissector:
    """A dissector that detects every payload but dissects only those starting ``claims``."""

    def dissect(payload: bytes) -> PayloadInfo | None:
        calls.append(name)
        return PayloadInfo(name, name) if payload.startswith(claims) else None

    return PayloadDissector(name, dissect, detect=lambda p: True, priority=priority,
                            detect_decides=decides)


def test_hide_skips_only_a_dissection_whose_detect_decides() -> None:
    calls: list[str] = []
    reg = Registry(load_entry_points=False)
    reg.register(_counting("quiet", 10, False, b"q", calls))
    reg.register(_counting("later", 20, False, b"", calls))
    # quiet's detect does not decide: its dissect runs, and declines: later's answer shows
    info = reg.dissect(b"x", 1, 2, hide="quiet")
    assert info is not None and info.protocol == "later" and calls == ["quiet", "later"]
    calls.clear()
    assert reg.dissect(b"q", 1, 2, hide="quiet") is None and calls == ["quiet"]
    # once it decides, a hidden claim is answered from detect alone
    reg.register(_counting("quiet", 10, True, b"", calls))
    calls.clear()
    assert reg.dissect(b"x", 1, 2, hide="quiet") is None and calls == []
    # the same dissector not hidden is dissected as before
    info = reg.dissect(b"x", 1, 2)
    assert info is not None and info.protocol == "quiet" and calls == ["quiet"]
    # a port dissector whose protocol is hidden hides too
    reg.register(PayloadDissector("port", lambda p: PayloadInfo("quiet", "q"),
                                  ports=frozenset({7})))
    assert reg.dissect(b"x", 1, 7, hide="quiet") is None
    assert reg.dissect(b"x", 1, 7) == PayloadInfo("quiet", "q")


def test_a_plugin_after_text_still_loses_to_text_when_text_is_hidden() -> None:
    """decode's lines hide text; a plugin heuristic ranked after text must not show up on a
    payload text claims (it did not before text was skipped), and must on one it does not."""
    reg = Registry(load_entry_points=False)
    for d in REGISTRY.dissectors.values():
        reg.register(d)
    reg.register(PayloadDissector("tail", lambda p: PayloadInfo("tail", "t"),
                                  detect=lambda p: True, priority=95))
    assert reg.dissect(b"hello\n", 1, 2, hide="text") is None
    assert reg.dissect(b"\x00\x01", 1, 2, hide="text") == PayloadInfo("tail", "t")
