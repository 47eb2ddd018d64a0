"""The server's edge, through a real server: trusted Host names (DNS rebinding) and
WebSocket origins (cross-site WebSocket hijacking)."""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gradwatch.server.app.settings import Settings
from tests.test_server_support import start_server

GW = "gw.example"


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """Bound to 127.0.0.1 (the default), one extra Host name and one extra origin."""
    folder = tmp_path_factory.mktemp("edge")
    process = start_server(f"sqlite:///{folder / 'edge.db'}", folder,
                           ["--allow-host", GW, "--allow-origin", f"https://{GW}"])
    yield process
    process.stop()


def _get(url: str, host: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.get(url + "/healthz", headers={"Host": host})


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "[::1]", "LOCALHOST:{port}", GW, f"{GW}:443"])
def test_loopback_server_answers_loopback_names_and_allowed_hosts(loopback, host):
    assert _get(loopback.url, host.format(port=loopback.port)).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}"])
def test_loopback_server_refuses_other_host_names_naming_the_flag(loopback, host):
    answer = _get(loopback.url, host.format(port=loopback.port))
    assert answer.status_code == 421
    assert "--allow-host" in answer.text and "GRADWATCH_ALLOW_HOST" in answer.text
    assert answer.text.count("evil.example") >= 1


def raw_request(port: int, head: str) -> tuple[int, bytes]:
    """Send `head` (request line and headers, CRLF-separated, no body) as written; the answer's
    status and bytes. For what an HTTP client will not send (two Host headers, a foreign Host
    on a WebSocket handshake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


WS_HANDSHAKE = ("GET {path} HTTP/1.1\r\n{hosts}Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13")


def test_host_check_covers_websockets(loopback):
    status, answer = raw_request(loopback.port, WS_HANDSHAKE.format(path="/ws/ingest",
                                                                    hosts="Host: evil.example\r\n"))
    assert status == 421 and b"--allow-host" in answer


@pytest.mark.parametrize("hosts", ["Host: evil.example\r\nHost: 127.0.0.1:{port}\r\n",
                                   "Host: 127.0.0.1:{port}\r\nHost: evil.example\r\n",
                                   "Host: localhost:1, evil.example\r\n",
                                   "Host: evil.example, localhost\r\n"])
@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_two_host_headers_or_a_list_are_refused(loopback, hosts, kind):
    hosts = hosts.format(port=loopback.port)
    head = (f"GET /healthz HTTP/1.1\r\n{hosts}Connection: close" if kind == "http" else
            WS_HANDSHAKE.format(path="/ws/ingest", hosts=hosts))
    status, answer = raw_request(loopback.port, head.rstrip("\r\n"))
    assert status == 400, answer[:300]


@pytest.mark.parametrize("bind", ["::ffff:127.0.0.1", "127.000.000.001", "127.1", "[::1]", "127.0.0.2"])
def test_loopback_is_recognised_whatever_its_spelling(bind):
    from gradwatch.server.app.security import allowed_hosts, is_loopback

    assert is_loopback(bind)
    assert allowed_hosts(bind, []) is not None and "evil.example" not in allowed_hosts(bind, [])


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "10.1.2.3", "::ffff:10.1.2.3", "gw.example"])
def test_other_bind_addresses_are_not_loopback(bind):
    from gradwatch.server.app.security import is_loopback

    assert not is_loopback(bind)


def test_server_bound_to_a_mapped_loopback_address_checks_the_host(tmp_path):
    """`serve --host 127.000.000.001` binds 127.0.0.1 and keeps the DNS-rebinding check on."""
    process = start_server(f"sqlite:///{tmp_path / 'mapped.db'}", tmp_path, ["--host", "127.000.000.001"])
    try:
        assert _get(process.url, "evil.example").status_code == 421
        assert _get(process.url, f"127.0.0.1:{process.port}").status_code == 200
    finally:
        process.stop()


async def _ws_open(url: str, origin: str | None) -> dict:
    """Open /ws/ingest with `origin`, send a batch, return the reply (or raise InvalidStatus)."""
    async with websockets.connect(f"{url}/ws/ingest", origin=origin) as ws:
        await ws.send(json.dumps({"type": "batch", "seq": 1, "run": "edge-origin",
                                  "batch": {"step": [0], "pre_norm": [1.0]}}))
        return json.loads(await ws.recv())


@pytest.mark.parametrize("origin", [None, "own", f"https://{GW}", f"HTTPS://{GW}/"])
def test_websocket_accepts_no_origin_own_origin_and_allowed(loopback, origin):
    if origin == "own":
        origin = loopback.url
    reply = asyncio.run(_ws_open(loopback.ws_url, origin))
    assert reply["type"] == "ack"


@pytest.mark.parametrize("origin", ["http://evil.example", f"http://{GW}", "null",
                                    "http://127.0.0.1:1", "http://localhost:{port}"])
def test_websocket_refuses_foreign_origins_naming_the_flag(loopback, origin):
    origin = origin.format(port=loopback.port)

    async def go(path):
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(f"{loopback.ws_url}{path}", origin=origin):
                pass
        return info.value.response

    for path in ("/ws/ingest", "/ws/live/edge-origin"):
        response = asyncio.run(go(path))
        assert response.status_code == 403
        assert b"--allow-origin" in response.body and b"GRADWATCH_ALLOW_ORIGIN" in response.body


def test_server_bound_elsewhere_answers_any_host(tmp_path):
    process = start_server(f"sqlite:///{tmp_path / 'any.db'}", tmp_path, ["--host", "0.0.0.0"])
    try:
        assert _get(process.url, "gradwatch.team.internal:8765").status_code == 200
        assert _get(process.url, "evil.example").status_code == 200
    finally:
        process.stop()


def test_settings_take_comma_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRADWATCH_ALLOW_ORIGIN", "https://a.example, https://b.example")
    monkeypatch.setenv("GRADWATCH_ALLOW_HOST", "a.example")
    settings = Settings()
    assert settings.allow_origin == ["https://a.example", "https://b.example"]
    assert settings.allow_host == ["a.example"]
    from gradwatch.server.commands.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--allow-host", "x.example", "--allow-host", "y.example,z"])
    assert settings_from_args(args).allow_host == ["x.example", "y.example", "z"]
