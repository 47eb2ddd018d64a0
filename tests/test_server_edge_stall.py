"""Stalled uploads, through a real server: nobody can hold what the others need.

A body is charged to the parse budget as its bytes arrive (never from its declared
Content-Length), a body that sends nothing for `--body-idle-timeout` seconds, or not
all of itself within its deadline, is answered 408 with `Connection: close`, and time
spent waiting on the budget is not idle time. No clock is asserted: the tests check
answers, and pytest-timeout bounds a hang.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.test_server_support import start_server

pytestmark = pytest.mark.timeout(180)

MSGPACK = "application/msgpack"


def stalled_upload(port: int, run: str, chunked: bool, declared: int = 32 << 20,
                   first: bytes = b"\x81", content_type: str = MSGPACK) -> socket.socket:
    """A POST that declares `declared` bytes (or is chunked) and sends only `first`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {declared}"
    head = (f"POST /api/runs/{run}/steps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{length}\r\n\r\n").encode()
    sock.sendall(head + (b"%x\r\n%s\r\n" % (len(first), first) if chunked else first))
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk


def budget(url: str) -> dict:
    with httpx.Client(timeout=60) as client:
        return client.get(url + "/healthz").json()["parse_budget"]


def wait_budget(url: str, test, what: str) -> dict:
    """Poll /healthz until `test(parse_budget)` holds (pytest-timeout bounds it)."""
    while True:
        state = budget(url)
        if test(state):
            return state
        time.sleep(0.05)


async def ws_batch(url: str, run: str) -> dict:
    async with websockets.connect(f"{url}/ws/ingest") as ws:
        await ws.send(json.dumps({"type": "batch", "seq": 7, "run": run,
                                  "batch": {"step": [0, 1], "pre_norm": [1.5, 2.5]}}))
        return json.loads(await ws.recv())


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """The idle bound long (120 s): stalled uploads stay open for the whole test."""
    folder = tmp_path_factory.mktemp("stall-patient")
    process = start_server(f"sqlite:///{folder / 'stall.db'}", folder, ["--body-idle-timeout", "120",
                                                                        "--body-deadline", "300"])
    yield process
    process.stop()


def test_fifty_stalled_uploads_do_not_stop_ingest(patient):
    """50 uploads declaring 32 MiB (or chunked) with one byte sent hold 50 bytes of the budget:
    a normal POST and an agent's WebSocket batch are answered meanwhile."""
    sockets = [stalled_upload(patient.port, f"stalled-{i}", chunked=i % 2 == 1) for i in range(50)]
    try:
        state = wait_budget(patient.url, lambda b: b["holders"] == 50, "50 holders")
        assert state["bytes"] == 50 and state["waiting"] == 0   # one byte each, not 50 x 32 MiB
        with httpx.Client(base_url=patient.url, timeout=30) as client:
            answer = client.post("/api/runs/normal/steps", json={"step": [0, 1, 2], "pre_norm": [1.0, 2.0, 3.0]})
        assert answer.status_code == 200 and answer.json()["accepted"] == 3
        reply = asyncio.run(asyncio.wait_for(ws_batch(patient.ws_url, "agent"), 30))
        assert reply["type"] == "ack" and reply["seq"] == 7 and reply["accepted"] == 2
        assert budget(patient.url)["holders"] == 50      # the stalled ones are still open
    finally:
        for sock in sockets:
            sock.close()
    wait_budget(patient.url, lambda b: b["holders"] == 0 and b["bytes"] == 0, "all released")
    with httpx.Client(base_url=patient.url, timeout=30) as client:
        names = {run["name"] for run in client.get("/api/runs").json()}
    assert {"normal", "agent"} <= names and not any(name.startswith("stalled-") for name in names)


@pytest.fixture(scope="module")
def trickle_server(tmp_path_factory):
    """Idle bound 1 s, whole-body minimum 20 s, max body 100 kB (budget 200 kB)."""
    folder = tmp_path_factory.mktemp("stall-trickle")
    process = start_server(f"sqlite:///{folder / 'trickle.db'}", folder,
                           ["--body-idle-timeout", "1", "--body-deadline", "20", "--max-body", "100000"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """Idle bound 4 s, whole-body minimum 2 s, max body 100 kB."""
    folder = tmp_path_factory.mktemp("stall-strict")
    process = start_server(f"sqlite:///{folder / 'strict.db'}", folder,
                           ["--body-idle-timeout", "4", "--body-deadline", "2", "--max-body", "100000"])
    yield process
    process.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_that_stops_sending_gets_408_and_the_connection_closed(trickle_server, chunked):
    sock = stalled_upload(trickle_server.port, "idle", chunked=chunked, declared=90_000)
    with sock:
        answer = read_to_end(sock)      # returns only once the server has closed the connection
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 408")
    assert b"connection: close" in head
    assert b"no body bytes for 1 s" in answer


def test_a_trickled_body_is_cut_at_its_deadline(strict):
    """A byte every 0.3 s never trips the 4 s idle bound, but the body as a whole has 2 s."""
    declared = 1_000
    sock = stalled_upload(strict.port, "trickle", chunked=False, declared=declared)
    sent = 1
    with sock:
        sock.settimeout(0.3)
        answer = b""
        while sent < declared:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")
                sent += 1
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
        sock.settimeout(60)
        answer += read_to_end(sock)
    assert sent < declared                          # cut before the client finished
    assert answer.lower().startswith(b"http/1.1 408") and b"took over 2 s" in answer


@pytest.mark.slow
def test_waiting_on_the_budget_is_not_idle(trickle_server):
    """Two uploads hold 99 kB each of the 200 kB budget and trickle a byte every 0.3 s, so they
    are cut only at their 20 s deadline; a complete 10 kB body waits on the budget all that
    time, far past the 1 s idle bound, and is answered 200 (not 408) once the two are cut."""
    strict = trickle_server
    stop = threading.Event()
    holders: list[socket.socket] = []

    def trickle():
        while not stop.wait(0.3):
            for sock in holders:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        holders.extend(stalled_upload(strict.port, f"holder-{i}", chunked=False, declared=100_000,
                                      first=b"\x81" + b" " * 98_999) for i in range(2))
        trickler.start()   # from the start: the holders are never idle
        wait_budget(strict.url, lambda b: b["holders"] == 2 and b["bytes"] >= 198_000, "two holders")
        body = json.dumps({"step": list(range(500)), "pre_norm": [1.25] * 500}).encode()
        body += b" " * (10_000 - len(body))
        with socket.create_connection(("127.0.0.1", strict.port), timeout=60) as waiter:
            waiter.sendall(b"POST /api/runs/waiter/steps HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            answer = read_to_end(waiter)
        stop.set()
        trickler.join(30)
        answers = [read_to_end(sock) for sock in holders]
    finally:
        stop.set()
        for sock in holders:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["accepted"] == 500
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:120] for a in answers]


@pytest.fixture(scope="module")
def small_budget(tmp_path_factory):
    """Max body 100 kB (budget 200 kB), idle bound long: stalled holders stay until closed."""
    folder = tmp_path_factory.mktemp("stall-small")
    process = start_server(f"sqlite:///{folder / 'small.db'}", folder,
                           ["--body-idle-timeout", "120", "--body-deadline", "300", "--max-body", "100000"])
    yield process
    process.stop()


def test_healthz_counts_requests_waiting_on_the_budget(small_budget):
    """Two stalled uploads hold 198 kB of the 200 kB budget: a complete body waits, /healthz
    says so (a count, not just 200); once the two hang up, it is stored."""
    url = small_budget.url
    holders = [stalled_upload(small_budget.port, f"hz-{i}", chunked=False, declared=100_000,
                              first=b"\x81" + b" " * 98_999) for i in range(2)]
    try:
        wait_budget(url, lambda b: b["holders"] == 2 and b["bytes"] == 198_000, "two holders")
        body = b'{"step": [0], "pre_norm": [1.0]}' + b" " * 5_000
        waiter = socket.create_connection(("127.0.0.1", small_budget.port), timeout=60)
        waiter.sendall(b"POST /api/runs/hz/steps HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = wait_budget(url, lambda b: b["waiting"] >= 1, "a waiter")
        assert seen == {"waiting": 1, "holders": 2, "bytes": 198_000, "capacity": 200_000}
    finally:
        for sock in holders:
            sock.close()
    with waiter:
        answer = read_to_end(waiter)
    assert answer.startswith(b"HTTP/1.1 200") and b'"accepted":1' in answer
    assert wait_budget(url, lambda b: b["holders"] == 0, "released")["bytes"] == 0


def test_past_max_connections_new_requests_get_503(tmp_path):
    """--max-connections 8: with 8 stalled uploads open a new request is answered 503 (not left
    hanging); once they hang up, it is answered 200. The open-file limit is raised to the hard one."""
    import resource

    process = start_server(f"sqlite:///{tmp_path / 'limit.db'}", tmp_path,
                           ["--max-connections", "8", "--body-idle-timeout", "120"])
    try:
        limits = Path(f"/proc/{process.process.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        soft, hard = row.split()[3:5]
        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] == resource.RLIM_INFINITY:
            assert hard == "unlimited" and int(soft) >= 1 << 20
        else:
            assert soft == hard == str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        sockets = [stalled_upload(process.port, f"full-{i}", chunked=False, declared=1000) for i in range(8)]
        try:
            while True:   # 200 until the server has taken all 8, then 503
                with httpx.Client(timeout=60) as client:
                    answer = client.get(process.url + "/healthz")
                if answer.status_code != 200:
                    break
                time.sleep(0.05)
            assert answer.status_code == 503
        finally:
            for sock in sockets:
                sock.close()
        while True:
            with httpx.Client(timeout=60) as client:
                answer = client.get(process.url + "/healthz")
            if answer.status_code == 200:
                break
            time.sleep(0.05)
        assert answer.json()["parse_budget"]["holders"] == 0
    finally:
        process.stop()
