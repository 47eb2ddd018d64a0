"""WebSocket ingest (ack protocol) and the live feed, with the `websockets` client."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.test_server_support import make_batch, start_server

WRITE, READ = "w-token", "r-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ws")
    process = start_server(f"sqlite:///{folder / 'ws.db'}", folder, ["--token", WRITE, "--read-token", READ])
    yield process
    process.stop()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def _ingest_session(url: str) -> list[dict]:
    rng = np.random.default_rng(0)
    replies = []
    async with websockets.connect(f"{url}/ws/ingest", additional_headers=bearer(WRITE)) as ws:
        first = make_batch(np.arange(0, 100), rng)
        messages = [
            {"type": "batch", "seq": 1, "run": "ws-run", "batch": first,
             "meta": {"clipper": {"name": "GlobalNorm", "max_norm": 1.5}, "host": "test"}},
            {"type": "batch", "seq": 2, "run": "ws-run", "batch": first},             # a re-send
            {"type": "batch", "seq": 3, "run": "ws-run", "batch": {"step": [5, 6], "pre_norm": [9.0]}},
            {"type": "batch", "seq": 4, "run": "ws-run",
             "events": [{"kind": "drop", "step": 100, "message": "spool full: 10 records dropped",
                         "detail": {"reason": "disk_cap", "count": 10}}]},
            {"type": "batch", "seq": 5, "run": "ws-run", "batch": make_batch(np.arange(100, 150), rng)},
        ]
        for message in messages:
            await ws.send(json.dumps(message))
        for _ in messages:
            replies.append(json.loads(await ws.recv()))
        await ws.send("not json")
        replies.append(json.loads(await ws.recv()))
    return replies


def test_ws_ingest_acks_each_batch_with_its_seq_after_commit(server):
    import httpx

    replies = asyncio.run(_ingest_session(server.ws_url))
    assert replies[0] == {"type": "ack", "seq": 1, "accepted": 100, "duplicates": 0, "conflicts": 0}
    assert replies[1] == {"type": "ack", "seq": 2, "accepted": 0, "duplicates": 100, "conflicts": 0}
    assert replies[2]["type"] == "error" and replies[2]["seq"] == 3 and replies[2]["status"] == 422
    assert "pre_norm" in replies[2]["detail"]
    assert replies[3] == {"type": "ack", "seq": 4, "accepted": 0, "duplicates": 0, "conflicts": 0}
    assert replies[4] == {"type": "ack", "seq": 5, "accepted": 50, "duplicates": 0, "conflicts": 0}
    assert replies[5]["type"] == "error" and replies[5]["status"] == 422
    with httpx.Client(base_url=server.url, headers=bearer(READ)) as client:
        run = {r["name"]: r for r in client.get("/api/runs").json()}["ws-run"]
        assert run["steps"] == 150 and client.get("/api/runs/ws-run").json()["meta"]["clipper"]["max_norm"] == 1.5
        drops = client.get("/api/runs/ws-run/events", params={"kind": "drop"}).json()
        assert drops[0]["step"] == 100 and drops[0]["detail"] == {"reason": "disk_cap", "count": 10}


async def _close_code(url: str, headers: dict) -> int:
    async with websockets.connect(url, additional_headers=headers) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as closed:
            return closed.rcvd.code
    raise AssertionError("not closed")


async def _handshake_status(url: str, headers: dict) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(url, additional_headers=headers):
            pass
    return refused.value.response.status_code


def test_ws_refuses_wrong_tokens_401_403_at_ingest_handshake_4401_4403_on_live(server):
    """/ws/ingest refuses before accept (HTTP), so no frame is ever read from a refused client;
    /ws/live accepts then closes (a browser cannot read a refused handshake's status)."""
    assert asyncio.run(_handshake_status(f"{server.ws_url}/ws/ingest", {})) == 401
    assert asyncio.run(_handshake_status(f"{server.ws_url}/ws/ingest", bearer("nope"))) == 401
    assert asyncio.run(_handshake_status(f"{server.ws_url}/ws/ingest", bearer(READ))) == 403
    assert asyncio.run(_close_code(f"{server.ws_url}/ws/live/ws-run", {})) == 4401
    assert asyncio.run(_close_code(f"{server.ws_url}/ws/live/ws-run?token={WRITE}", {})) == 4403


async def _live_session(url: str) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(1)
    batch = make_batch(np.arange(1000, 1010), rng, nonfinite_every=4)
    async with websockets.connect(f"{url}/ws/live/live-run?token={READ}") as live:
        async with websockets.connect(f"{url}/ws/ingest", additional_headers=bearer(WRITE)) as ingest:
            await asyncio.sleep(0.2)  # let the live socket subscribe
            await ingest.send(json.dumps({"type": "batch", "seq": 1, "run": "live-run", "batch": batch}))
            ack = json.loads(await ingest.recv())
            assert ack["accepted"] == 10
            await ingest.send(json.dumps({"type": "batch", "seq": 2, "run": "other-run", "batch": batch}))
            await ingest.recv()
            pushed = json.loads(await asyncio.wait_for(live.recv(), 10))
    return [pushed], batch


def test_live_socket_gets_points_pushed_after_commit(server):
    messages, batch = asyncio.run(_live_session(server.ws_url))
    pushed = messages[0]
    assert pushed["type"] == "points" and pushed["run"] == "live-run"
    data = pushed["data"]
    assert data["step"] == batch["step"]
    assert data["pre_norm"] == batch["pre_norm"]      # NaN/Infinity as strings
    assert data["clipped"] == batch["clipped"] and data["loss"] == batch["loss"]
    assert set(data) == {"step", "pre_norm", "post_norm", "threshold", "clipped", "loss", "spike", "nonfinite"}


async def _live_since(url: str) -> dict:
    async with websockets.connect(f"{url}/ws/live/since-run?token={READ}&since=1004") as live:
        return json.loads(await asyncio.wait_for(live.recv(), 10))


def test_live_socket_replays_points_after_since(server):
    import httpx

    batch = make_batch(np.arange(1000, 1010), np.random.default_rng(2))
    with httpx.Client(base_url=server.url, headers=bearer(WRITE)) as client:
        assert client.post("/api/runs/since-run/steps", json=batch).status_code == 200
    replay = asyncio.run(_live_since(server.ws_url))
    assert replay["data"]["step"] == list(range(1005, 1010))
    assert replay["data"]["pre_norm"] == batch["pre_norm"][5:]


async def _send_events(url: str, events_list: list[list[dict]]) -> list[dict]:
    replies = []
    async with websockets.connect(f"{url}/ws/ingest", additional_headers=bearer(WRITE)) as ws:
        for seq, events in enumerate(events_list, start=1):
            await ws.send(json.dumps({"type": "batch", "seq": seq, "run": "ev-run", "events": events}))
            replies.append(json.loads(await ws.recv()))
    return replies


def test_ws_events_about_a_step_need_the_step(server):
    import httpx

    replies = asyncio.run(_send_events(server.ws_url, [
        [{"kind": "spike", "step": None, "message": "no step"}],
        [{"kind": "clip", "message": "no step at all"}],
        [{"kind": "nonfinite", "step": True}],
        [{"kind": "spike", "step": 2**53}],
        [{"kind": "drop", "message": "spool full", "detail": {"reason": "disk_cap", "count": 3}}],
        [{"kind": "spike", "step": 7, "message": "agent spike"}],
    ]))
    for reply, kind in zip(replies[:4], ("spike", "clip", "nonfinite", "spike")):
        assert reply["type"] == "error" and reply["status"] == 422, reply
        assert "events[0].step" in reply["detail"]
    assert replies[4]["type"] == "ack" and replies[5]["type"] == "ack"
    with httpx.Client(base_url=server.url, headers=bearer(READ)) as client:
        stored = client.get("/api/runs/ev-run/events").json()
        assert [(event["step"], event["kind"]) for event in stored] == [(7, "spike"), (None, "drop")]
