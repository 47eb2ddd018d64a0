"""Reads at the edge, through a real server: no read sees a run before its first batch
commits, an empty batch stores no run, `start > end` is 422, run names are printable,
tokens travel in the query string only for the CSV download and `/ws/live`."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import websockets

from tests.test_server_support import start_server

WRITE, READ = "w-edge", "r-edge"
AUTH_W = {"Authorization": f"Bearer {WRITE}"}
AUTH_R = {"Authorization": f"Bearer {READ}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-reads")
    process = start_server(f"sqlite:///{folder / 'edge.db'}", folder, ["--token", WRITE, "--read-token", READ])
    yield process
    process.stop()


def batch(n: int, first: int = 0) -> dict:
    return {"step": list(range(first, first + n)), "pre_norm": [1.0 + (i % 7) for i in range(n)],
            "clipped": [i % 3 == 0 for i in range(n)]}


def test_no_read_sees_a_run_before_its_first_batch_commits(server):
    names = [f"race-{i}" for i in range(20)]
    done = threading.Event()
    failures: list[str] = []

    def write():
        with httpx.Client(base_url=server.url, headers=AUTH_W, timeout=60) as client:
            for name in names:
                answer = client.post(f"/api/runs/{name}/steps", json=batch(50))
                if answer.status_code != 200:
                    failures.append(f"ingest {name}: {answer.status_code}")
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    polls = 0
    with httpx.Client(base_url=server.url, headers=AUTH_R, timeout=60) as client:
        while True:
            finished = done.is_set()   # one full pass after the writer is done
            for run in client.get("/api/runs").json():
                if run["steps"] != 50 or run["first_step"] != 0 or run["last_step"] != 49:
                    failures.append(f"/api/runs shows {run['name']} half-stored: {run}")
            for name in names:
                for path in ("stats", "series", "histogram", "recommendation"):
                    answer = client.get(f"/api/runs/{name}/{path}")
                    polls += 1
                    if answer.status_code == 404:
                        continue
                    if answer.status_code != 200:
                        failures.append(f"{path} of {name}: {answer.status_code} {answer.text[:200]}")
                    elif path == "stats" and answer.json()["count"] != 50:
                        failures.append(f"stats of {name} saw {answer.json()['count']} steps")
                    elif path == "series" and len(answer.json()["step"]) != 50:
                        failures.append(f"series of {name} saw {len(answer.json()['step'])} steps")
            if finished:
                break
    writer.join()
    assert not failures, failures[:5]
    with httpx.Client(base_url=server.url, headers=AUTH_R, timeout=60) as client:
        stored = {run["name"]: run["steps"] for run in client.get("/api/runs").json()}
    assert {name: stored.get(name) for name in names} == {name: 50 for name in names}
    assert polls >= 80


def test_an_empty_batch_stores_no_run(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/api/runs/empty-run/steps", json={"step": [], "pre_norm": []}, headers=AUTH_W)
        assert answer.json() == {"accepted": 0, "duplicates": 0, "conflicts": 0}
        assert client.get("/api/runs/empty-run/stats", headers=AUTH_R).status_code == 404

    async def ws():
        async with websockets.connect(f"{server.ws_url}/ws/ingest", additional_headers=AUTH_W) as sock:
            await sock.send(json.dumps({"type": "batch", "seq": 1, "run": "empty-ws",
                                        "batch": {"step": [], "pre_norm": []}}))
            return json.loads(await sock.recv())

    assert asyncio.run(ws())["accepted"] == 0
    with httpx.Client(base_url=server.url, headers=AUTH_R, timeout=30) as client:
        names = {run["name"] for run in client.get("/api/runs").json()}
    assert not names & {"empty-run", "empty-ws"}


@pytest.mark.parametrize("path", ["series", "tensors"])
def test_start_after_end_is_422(server, path):
    with httpx.Client(base_url=server.url, headers={**AUTH_W, **AUTH_R}, timeout=30) as client:
        client.post("/api/runs/range-run/steps", json=batch(100), headers=AUTH_W)
        answer = client.get(f"/api/runs/range-run/{path}", params={"start": 50, "end": 10}, headers=AUTH_R)
        assert answer.status_code == 422 and "start (50) is after end (10)" in answer.text
        assert client.get(f"/api/runs/range-run/{path}", params={"start": 10, "end": 10},
                          headers=AUTH_R).status_code == 200


@pytest.mark.parametrize("name, words", [
    (".", "must not be '.'"), ("..", "must not be '..'"), ("   ", "blank"), ("", "1 to 200"),
    ("evil\u202etxt", "U+202E"), ("zero\u200bwidth", "U+200B"), ("tab\there", "U+0009"),
    ("nul\x00", "U+0000"), ("bell\x07", "U+0007"), ("a" * 201, "1 to 200"),
])
def test_run_names_must_be_printable_and_not_dots_or_blank(server, name, words):
    async def ws():
        async with websockets.connect(f"{server.ws_url}/ws/ingest", additional_headers=AUTH_W) as sock:
            await sock.send(json.dumps({"type": "batch", "seq": 1, "run": name, "batch": batch(2)}))
            return json.loads(await sock.recv())

    reply = asyncio.run(ws())
    assert reply["status"] == 422 and words in reply["detail"], reply
    if name.strip() and name not in (".", "..") and "\x00" not in name:
        from urllib.parse import quote

        with httpx.Client(base_url=server.url, timeout=30) as client:
            answer = client.post(f"/api/runs/{quote(name, safe='')}/steps", json=batch(2), headers=AUTH_W)
        assert answer.status_code == 422 and words in answer.json()["detail"]


def test_names_with_spaces_dots_and_unicode_still_work(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name in ("my run", "v1.2", "...", "ラン-1", "a.."):
            from urllib.parse import quote

            answer = client.post(f"/api/runs/{quote(name, safe='')}/steps", json=batch(2), headers=AUTH_W)
            assert answer.status_code == 200, (name, answer.text)


def test_tokens_in_the_query_string_only_for_csv_and_live(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/api/runs/tok-run/steps", json=batch(3), headers=AUTH_W)
        assert client.post("/api/runs/tok-run/steps", params={"token": WRITE}, json=batch(3, 3)).status_code == 401
        assert client.delete("/api/runs/tok-run", params={"token": WRITE}).status_code == 401
        assert client.get("/api/runs", params={"token": READ}).status_code == 401
        assert client.get("/api/runs/tok-run/stats", params={"token": READ}).status_code == 401
        csv = client.get("/api/runs/tok-run/export.csv", params={"token": READ})
        assert csv.status_code == 200 and csv.text.count("\n") >= 4
        assert client.get("/api/runs/tok-run/series", headers=AUTH_R).json()["step"] == [0, 1, 2]

    async def ws():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:  # refused before accept()
            async with websockets.connect(f"{server.ws_url}/ws/ingest?token={WRITE}"):
                pass
        ingest_code = refused.value.response.status_code
        async with websockets.connect(f"{server.ws_url}/ws/live/tok-run?token={READ}&since=-1") as sock:
            live = json.loads(await asyncio.wait_for(sock.recv(), 30))
        return ingest_code, live

    ingest_code, live = asyncio.run(ws())
    assert ingest_code == 401
    assert live["type"] == "points" and live["data"]["step"] == [0, 1, 2]


@pytest.mark.parametrize("cursor", ["NQ", "bnVsbA", "dHJ1ZQ", "MS41", "WzFd", "WyJhIiwxXQ", "e30", "!!!", "%FF"])
def test_junk_cursors_are_422_not_500(server, cursor):
    """base64url of 5, null, true, 1.5, [1], ["a",1], {} and text that is not base64 at all."""
    with httpx.Client(base_url=server.url, headers=AUTH_R, timeout=60) as client:
        answer = client.get("/api/runs", params={"cursor": cursor, "limit": 1})
    assert answer.status_code == 422, answer.text
    assert "X-Next-Cursor" in answer.json()["detail"]
