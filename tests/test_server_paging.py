"""The API for tools: paged run list, one run with meta, events that say when they were cut,
and events that say which threshold they carry; through a real server."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import websockets

from tests.test_server_support import make_batch, post, start_server


async def _send_meta(url: str) -> None:
    """Meta arrives over the agent's WebSocket (the HTTP body carries steps only)."""
    async with websockets.connect(f"{url}/ws/ingest") as ws:
        for i in range(7):
            meta = {"config": {"index": i}, "tensors": {"names": [f"w{j}" for j in range(50)]}}
            await ws.send(json.dumps({"type": "batch", "seq": i + 1, "run": f"run-{i}", "meta": meta}))
            assert json.loads(await ws.recv())["type"] == "ack"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paging")
    process = start_server(f"sqlite:///{tmp / 'paging.db'}", tmp)
    rng = np.random.default_rng(3)
    with httpx.Client(base_url=process.url, timeout=30) as client:
        for i in range(7):
            body = make_batch(np.arange(0, 20), rng, spike_steps=[5, 9] if i == 0 else [])
            assert post(client, f"run-{i}", body).status_code == 200
    asyncio.run(_send_meta(process.ws_url))
    yield process
    process.stop()


def test_runs_page_through_with_headers_and_no_meta(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        everything = client.get("/api/runs")
        assert everything.headers["X-Total-Count"] == "7" and "X-Next-Cursor" not in everything.headers
        full = everything.json()
        assert isinstance(full, list) and all("meta" not in run for run in full)
        # An independent order: updated descending, then name.
        expected = [r["name"] for r in sorted(sorted(full, key=lambda r: r["name"]),
                                              key=lambda r: r["updated"], reverse=True)]
        seen, cursor, pages = [], None, 0
        while True:
            answer = client.get("/api/runs", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert answer.status_code == 200 and answer.headers["X-Total-Count"] == "7"
            page = answer.json()
            assert len(page) <= 3
            seen += [run["name"] for run in page]
            pages += 1
            cursor = answer.headers.get("X-Next-Cursor")
            if cursor is None:
                break
        assert pages == 3 and seen == expected and sorted(seen) == [f"run-{i}" for i in range(7)]
        assert client.get("/api/runs", params={"cursor": "garbage!"}).status_code == 422
        assert client.get("/api/runs", params={"limit": 0}).status_code == 422


def test_one_run_carries_meta_and_the_list_counters(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        run = client.get("/api/runs/run-2").json()
        assert run["meta"]["config"] == {"index": 2} and len(run["meta"]["tensors"]["names"]) == 50
        listed = {r["name"]: r for r in client.get("/api/runs").json()}["run-2"]
        assert {k: v for k, v in run.items() if k != "meta"} == listed
        assert client.get("/api/runs/nope").status_code == 404


def test_events_say_when_cut_and_which_threshold(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        everything = client.get("/api/runs/run-0/events")
        rows = everything.json()
        clips = client.get("/api/runs/run-0").json()["clips"]
        # 2 stored spike events plus one clip event per clipped step, counted by hand.
        assert everything.headers["X-Total-Count"] == str(2 + clips) == str(len(rows))
        assert everything.headers["X-Truncated"] == "false"
        cut = client.get("/api/runs/run-0/events", params={"limit": 1})
        assert len(cut.json()) == 1 and cut.headers["X-Truncated"] == "true"
        assert cut.headers["X-Total-Count"] == str(2 + clips)
        spikes = client.get("/api/runs/run-0/events", params={"kind": "spike", "limit": 1})
        assert spikes.headers["X-Total-Count"] == "2" and spikes.headers["X-Truncated"] == "true"
        assert spikes.json()[0]["threshold_kind"] == "clip" and spikes.json()[0]["threshold"] == 1.5
        assert {row["threshold_kind"] for row in rows if row["kind"] == "clip"} == {"clip"}
