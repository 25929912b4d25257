"""Payload dissectors and their registry: port table, heuristics, plugins by entry point."""

from __future__ import annotations

import sys
import textwrap

import pytest

from vsockmon.payload import (
    PayloadDissector,
    PayloadInfo,
    Registry,
    dissect,
    dissect_frame,
    protobuf,
    ttrpc,
)


def test_protobuf_roundtrip_and_errors() -> None:
    msg = protobuf.encode_field(1, "svc") + protobuf.encode_field(4, 300)
    assert protobuf.parse(msg) == {1: [b"svc"], 4: [300]}
    assert protobuf.to_signed(protobuf.read_varint(protobuf.encode_varint(2**64 - 1), 0)[0],
                              32) == -1
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0b", b"\x00\x01"):
        with pytest.raises(protobuf.ProtobufError):
            protobuf.parse(bad)


def test_ttrpc_request_names_service_and_method() -> None:
    p = ttrpc.encode_request(3, "grpc.AgentService", "CreateContainer", b"\x08\x01",
                             timeout_ns=10**9, metadata=(("k", "v"),))
    info = dissect(p, 50000, 1024)
    assert info is not None and info.protocol == "ttrpc"
    assert info.summary == "request #3 grpc.AgentService/CreateContainer"
    assert info.fields["ttrpc.method"] == "grpc.AgentService/CreateContainer"
    assert info.fields["ttrpc.timeout_ns"] == 10**9
    assert "    Metadata: k=v" in info.lines()


def test_ttrpc_response_status_and_several_messages() -> None:
    p = ttrpc.encode_response(3, b"x", code=5, message="no such container")
    p += ttrpc.encode(5, ttrpc.MsgType.DATA, b"abc", flags=ttrpc.MsgFlag.REMOTE_CLOSED)
    info = dissect(p, 1024, 50000)  # the reply comes FROM the well-known port
    assert info is not None
    assert info.summary == "response #3 NOT_FOUND: no such container; data #5 3 bytes"
    assert info.fields["ttrpc.status.code"] == 5 and info.fields["ttrpc.messages"] == 2
    assert "    Flags: 0x01 (remote_closed)" in info.lines()


def test_ttrpc_fragments_on_its_port() -> None:
    p = ttrpc.encode_request(1, "grpc.AgentService", "CopyFile", b"z" * 5000)
    first = dissect(p[:100], 40000, 1024)
    assert first is not None and first.summary.endswith("(partial, 90 of 5032 bytes)")
    assert "CopyFile" in first.summary
    rest = dissect(p[100:], 40000, 1024)
    assert rest is not None and rest.summary == "continuation, 4942 bytes"


def test_ttrpc_heuristic_is_strict() -> None:
    p = ttrpc.encode_request(1, "svc", "M")
    assert ttrpc.detect(p)
    assert dissect(p, 5000, 6000).protocol == "ttrpc"  # type: ignore[union-attr]
    assert not ttrpc.detect(p[:-1]) and not ttrpc.detect(p + b"x")
    assert not ttrpc.detect(b"\x00\x00\x00\x02\x00\x00\x00\x01\x09\x00ab")  # type 9


def test_text_json_http_heuristics() -> None:
    sd = dissect(b"READY=1\nSTATUS=Serving\n", 3, 4)
    assert sd is not None and sd.protocol == "sd_notify"
    assert sd.fields == {"sd_notify.READY": "1", "sd_notify.STATUS": "Serving"}
    js = dissect(b'{"execute": "guest-ping"}\r\n{"return": {}}\r\n', 3, 4)
    assert js is not None and js.summary == "execute guest-ping; return {}"
    assert js.fields["json.execute"] == "guest-ping"
    cut = dissect(b'{"execute": "gu', 3, 4)
    assert cut is not None and cut.summary == "incomplete, 15 bytes"
    http = dissect(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 80, 4000)
    assert http is not None and http.fields["http.response.code"] == 404
    text = dissect(b"hello\nworld\n", 3, 4)
    assert text is not None and (text.protocol, text.summary) == ("text", "hello")
    assert dissect(bytes(range(256)), 3, 4) is None
    assert dissect(b"", 3, 1024) is None


def test_dissect_frame_trusts_header_len() -> None:
    class F:
        has_virtio = True
        virtio = {"len": 8, "src_port": 9, "dst_port": 10}  # noqa: RUF012
        payload = b"READY=1\nSTATUS=surplus bytes of the tap-length bug\n"

    info = dissect_frame(F())
    assert info is not None and info.summary == "READY=1"


def _info(name: str) -> PayloadInfo:
    return PayloadInfo(name, name)


def test_registry_port_then_heuristic_priority_and_broken_dissector() -> None:
    def boom(_: bytes) -> PayloadInfo:
        raise RuntimeError("bug")

    reg = Registry(load_entry_points=False)
    reg.register(PayloadDissector("low", lambda b: _info("low"), detect=lambda b: True,
                                  priority=50))
    reg.register(PayloadDissector("high", lambda b: _info("high"), detect=lambda b: True,
                                  priority=5))
    reg.register(PayloadDissector("port", lambda b: _info("port"), ports=frozenset({77})))
    reg.register(PayloadDissector("broken", boom, ports=frozenset({78}), detect=lambda b: True,
                                  priority=1))
    assert reg.dissect(b"x", 1, 77).protocol == "port"  # type: ignore[union-attr]
    assert reg.dissect(b"x", 77, 1).protocol == "port"  # type: ignore[union-attr]
    assert reg.dissect(b"x", 1, 78).protocol == "high"  # type: ignore[union-attr]
    reg.unregister("high")
    assert reg.dissect(b"x", 1, 2).protocol == "low"  # type: ignore[union-attr]


def test_entry_point_plugin(tmp_path, monkeypatch) -> None:
    (tmp_path / "vsm_demo_plugin.py").write_text(textwrap.dedent("""
        from vsockmon.payload import PayloadDissector, PayloadInfo

        def _dissect(payload):
            return PayloadInfo("demo", f"demo {payload[1]}", (), {"demo.value": payload[1]})

        DISSECTOR = PayloadDissector("demo", _dissect, ports=frozenset({4242}),
                                     detect=lambda p: p[:1] == b"\\xd0", priority=1)
    """))
    dist = tmp_path / "vsm_demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsm-demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vsockmon.payload]\ndemo = vsm_demo_plugin:DISSECTOR\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    from vsockmon.payload import REGISTRY
    for d in REGISTRY.dissectors.values():
        reg.register(d)
    assert reg.dissect(b"\x01\x07", 1000, 4242).summary == "demo 7"  # type: ignore[union-attr]
    assert reg.dissect(b"\xd0\x09", 1000, 2000).fields == {"demo.value": 9}  # type: ignore[union-attr]
    assert reg.dissect(b"READY=1\n", 1000, 2000).protocol == "sd_notify"  # type: ignore[union-attr]
    assert "vsm_demo_plugin" in sys.modules


def test_broken_entry_point_warns(tmp_path, monkeypatch) -> None:
    dist = tmp_path / "vsm_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsm-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vsockmon.payload]\nbad = no_such_module_xyz:D\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    with pytest.warns(UserWarning, match="'bad'"):
        assert reg.all() == []


def test_control_characters_of_a_payload_are_escaped_in_every_view() -> None:
    """Found by fuzzing the decoder: a newline in a ttrpc service name split decode's
    one-line view in two; an ESC would have reached the terminal."""
    p = ttrpc.encode_request(1, "grpc.Agent\nFAKE LINE\x1b[2J", "Check")
    info = dissect(p, 50000, 1024)
    assert info is not None
    assert info.summary == "request #1 grpc.Agent\\nFAKE LINE\\x1b[2J/Check"
    assert all("\n" not in line and "\x1b" not in line for line in info.lines())
    # the raw value stays in the fields, for scripts (JSON escapes it)
    assert info.fields["ttrpc.method"] == "grpc.Agent\nFAKE LINE\x1b[2J/Check"
