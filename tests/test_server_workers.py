"""`gradwatch serve --workers 2`: each worker its own SO_REUSEPORT socket, one supervisor.

Real processes on a real SQLite file: connections spread over both workers, ingest
through both stores every step once, SIGTERM stops every worker, a worker that dies is
restarted while the port answers through the other (N crashes a minute take the server
down with a non-zero status), and a killed supervisor leaves no worker.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.procs import (ServerProcess, WORKER_HEADER, answering_worker, child_pids, pid_alive,
                         wait_for_workers)
from tests.conftest import missing
from tests.test_server_support import make_batch



@pytest.fixture(autouse=True)
def _linux():
    if not sys.platform.startswith("linux"):  # elsewhere `serve` falls back to uvicorn's workers
        missing("per-worker SO_REUSEPORT sockets (and /proc, which these tests read) are Linux-only")


def start_workers(tmp_path, count: int = 2) -> tuple[ServerProcess, set[int]]:
    server = ServerProcess(f"sqlite:///{tmp_path / 'gradwatch.db'}", extra_args=["--workers", str(count)],
                           log_path=tmp_path / "server.log").start()
    pids = wait_for_workers(server, count)
    assert pids == child_pids(server.process.pid)  # the answering processes are the supervisor's children
    return server, pids


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """The pids still alive after `timeout` s (each exits asynchronously after its pipe closes)."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {pid for pid in pids if pid_alive(pid)}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    server, pids = start_workers(tmp_path_factory.mktemp("workers"))
    yield server, pids
    server.stop()


def test_keep_alive_connections_spread_over_both_workers(two_workers):
    server, pids = two_workers
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(32)]
    try:
        first = [answering_worker(server.port, connection) for connection in connections]
        again = [answering_worker(server.port, connection) for connection in connections]
    finally:
        for connection in connections:
            connection.close()
    assert again == first                 # a keep-alive connection stays with its worker
    assert set(first) == pids             # and both workers got some (all on one: p = 2**-31)
    assert min(first.count(pid) for pid in pids) >= 1


def _connections_per_worker(port: int, pids: set[int], each: int) -> list[http.client.HTTPConnection]:
    """`each` keep-alive connections answered by every worker (new ones until each has its share)."""
    held = {pid: [] for pid in pids}
    spare = []
    while any(len(group) < each for group in held.values()):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        pid = answering_worker(port, connection)
        (held[pid] if len(held[pid]) < each else spare).append(connection)
    for connection in spare:
        connection.close()
    return [connection for group in held.values() for connection in group]


def test_ingest_through_both_workers_stores_every_step_once(two_workers):
    server, pids = two_workers
    batch = make_batch(np.arange(3000), np.random.default_rng(7), nonfinite_every=17, spike_steps=[1234])
    parts = [{k: v[start:start + 1000] for k, v in batch.items()} for start in (0, 500, 1000, 1500, 2000)]
    connections = _connections_per_worker(server.port, pids, each=2)
    answers: list[tuple[int, dict]] = []
    failures: list[str] = []

    def send(connection: http.client.HTTPConnection, order: list[dict]) -> None:
        try:
            for part in order:
                connection.request("POST", "/api/runs/spread/steps", body=json.dumps(part),
                                   headers={"Content-Type": "application/json"})
                answer = connection.getresponse()
                body = answer.read()
                if answer.status != 200:
                    failures.append(f"{answer.status}: {body[:200]!r}")
                    return
                answers.append((int(answer.getheader(WORKER_HEADER)), json.loads(body)))
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(repr(error))

    orders = [parts, parts[::-1], parts[1:] + parts[:1], parts[3:] + parts[:3]]
    threads = [threading.Thread(target=send, args=(c, o)) for c, o in zip(connections, orders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for connection in connections:
        connection.close()
    assert failures == []
    assert {pid for pid, _ in answers} == pids
    assert len(answers) == 4 * 5
    assert sum(a["accepted"] for _, a in answers) == 3000
    assert sum(a["conflicts"] for _, a in answers) == 0
    assert sum(a["accepted"] + a["duplicates"] for _, a in answers) == 4 * 5 * 1000
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert {r["name"]: r for r in client.get("/api/runs").json()}["spread"]["steps"] == 3000
        series = client.get("/api/runs/spread/series", params={"points": 5000}).json()
        assert series["step"] == batch["step"]
        assert series["pre_norm"] == batch["pre_norm"] and series["loss"] == batch["loss"]


def test_sigterm_stops_every_worker(tmp_path):
    server, pids = start_workers(tmp_path)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert {pid for pid in pids if pid_alive(pid)} == set()  # the supervisor waited for (reaped) them


def wait_restarted(server: ServerProcess, gone: int, survivor: int, timeout: float = 60.0) -> int:
    """The pid of the worker that replaced `gone`: a child of the supervisor that answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = child_pids(server.process.pid) - {gone, survivor}
        if children:
            replacement = children.pop()
            seen = set()
            while replacement not in seen and time.monotonic() < deadline:
                seen.add(answering_worker(server.port))
            if replacement in seen:
                return replacement
        time.sleep(0.05)
    raise RuntimeError(f"no replacement for worker {gone} answered within {timeout} s")


def post_with_retry(client: httpx.Client, run: str, part: dict) -> dict:
    """A POST the way an agent sends: a connection reset by a dying worker is sent again."""
    for _ in range(50):
        try:
            answer = client.post(f"/api/runs/{run}/steps", json=part)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        assert answer.status_code == 200, answer.text
        return answer.json()
    raise RuntimeError("the server did not take the batch in 50 tries")


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_nothing_is_lost(tmp_path):
    """kill -9 of one of two workers while a writer sends batches: the port keeps answering
    through the survivor, a replacement starts on a fresh socket, every step is stored once."""
    server, pids = start_workers(tmp_path)
    try:
        victim, survivor = sorted(pids)
        batch = make_batch(np.arange(4000), np.random.default_rng(3))
        parts = [{k: v[start:start + 200] for k, v in batch.items()} for start in range(0, 4000, 200)]
        answers = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for number, part in enumerate(parts):
                if number == len(parts) // 2:
                    subprocess.run(["kill", "-9", str(victim)], check=True)
                    while Path(f"/proc/{victim}").exists():   # reaped: every thread gone, socket closed
                        time.sleep(0.02)
                    # the survivor answers while the replacement starts, on new connections each time
                    assert {answering_worker(server.port) for _ in range(20)} <= {survivor} | set(
                        child_pids(server.process.pid))
                answers.append(post_with_retry(client, "restart", part))
        replacement = wait_restarted(server, victim, survivor)
        assert server.process.poll() is None and replacement not in pids
        assert wait_for_workers(server, 2) == {survivor, replacement}
        assert sum(a["accepted"] for a in answers) + sum(a["duplicates"] for a in answers) >= 4000
        assert sum(a["conflicts"] for a in answers) == 0
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert {r["name"]: r for r in client.get("/api/runs").json()}["restart"]["steps"] == 4000
            series = client.get("/api/runs/restart/series", params={"points": 5000}).json()
        assert series["step"] == batch["step"] and series["pre_norm"] == batch["pre_norm"]
        log = (tmp_path / "server.log").read_text()
        assert f"worker 0 (pid {victim}) was killed by signal 9; restarting it in" in log or \
               f"worker 1 (pid {victim}) was killed by signal 9; restarting it in" in log
        assert f"restarted as pid {replacement}" in log
    finally:
        server.stop()
    assert server.process.returncode == 0


@pytest.mark.slow
def test_n_crashes_within_a_minute_stop_the_server_with_an_error(tmp_path):
    """--workers 2: the second crash within a minute is one too many: exit 1, none left."""
    server, pids = start_workers(tmp_path)
    victim, survivor = sorted(pids)
    subprocess.run(["kill", "-9", str(victim)], check=True)
    replacement = wait_restarted(server, victim, survivor)
    subprocess.run(["kill", "-9", str(replacement)], check=True)
    assert server.process.wait(timeout=60) == 1
    assert not pid_alive(survivor)
    log = (tmp_path / "server.log").read_text()
    assert f"(pid {replacement}) was killed by signal 9; 2 crashes within 60 s" in log
    assert "stopping the others" in log


@pytest.mark.slow
def test_a_killed_supervisor_leaves_no_worker(tmp_path):
    server, pids = start_workers(tmp_path)
    server.kill()  # SIGKILL: no chance to forward anything
    assert wait_gone(pids) == set()
    with pytest.raises(OSError):
        answering_worker(server.port)


@pytest.mark.slow
def test_a_taken_port_is_a_clear_error_even_for_another_reuseport_server(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--db",
                                 f"sqlite:///{tmp_path / 'a.db'}", "--port", str(port), "--workers", "2"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    first, pids = start_workers(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-m", "gradwatch.server.commands.cli", "serve", "--db",
                                 f"sqlite:///{tmp_path / 'b.db'}", "--port", str(first.port), "--workers", "2"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{first.port}" in result.stderr
        assert answering_worker(first.port) in pids
    finally:
        first.stop()
