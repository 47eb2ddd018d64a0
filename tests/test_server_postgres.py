"""Two server processes on one PostgreSQL database: each serves what the other ingested."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
import websockets

from tests.test_server_support import fresh_postgres_db, make_batch, post, start_server


@pytest.fixture(scope="module")
def two_servers(request, tmp_path_factory):
    url = fresh_postgres_db(request.getfixturevalue("postgres_url"))
    first = start_server(url, tmp_path_factory.mktemp("pg-a"))
    second = start_server(url, tmp_path_factory.mktemp("pg-b"))
    yield first, second
    first.stop()
    second.stop()


def test_each_server_reads_what_the_other_ingested(two_servers):
    a, b = two_servers
    rng = np.random.default_rng(0)
    batch = make_batch(np.arange(500), rng, nonfinite_every=13, spike_steps=[250])
    with httpx.Client(base_url=a.url, timeout=60) as client_a, httpx.Client(base_url=b.url, timeout=60) as client_b:
        # Warm b's cache first, so it must notice the new rows.
        assert post(client_a, "shared", {k: v[:100] for k, v in batch.items()}).json()["accepted"] == 100
        assert client_b.get("/api/runs/shared/stats").json()["count"] == 100
        assert post(client_b, "shared", {k: v[100:] for k, v in batch.items()}).json()["accepted"] == 400
        for client in (client_a, client_b):
            series = client.get("/api/runs/shared/series", params={"points": 1000}).json()
            assert series["step"] == batch["step"] and series["pre_norm"] == batch["pre_norm"]
            assert client.get("/api/runs/shared/stats").json()["count"] == 500
            assert [e["step"] for e in client.get("/api/runs/shared/events", params={"kind": "spike"}).json()] == [250]


def test_concurrent_overlapping_ingest_through_both_stores_each_step_once(two_servers):
    a, b = two_servers
    batch = make_batch(np.arange(3000), np.random.default_rng(1))
    parts = [{k: v[start:start + 1000] for k, v in batch.items()} for start in (0, 500, 1000, 1500, 2000)]
    answers: list[dict] = []

    def send(server, chunks):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for chunk in chunks:
                answer = post(client, "race", chunk)
                assert answer.status_code == 200, answer.text
                answers.append(answer.json())

    threads = [threading.Thread(target=send, args=(a, parts)), threading.Thread(target=send, args=(b, parts[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sum(answer["accepted"] for answer in answers) == 3000
    assert sum(answer["conflicts"] for answer in answers) == 0
    assert sum(answer["accepted"] + answer["duplicates"] for answer in answers) == 2 * 5 * 1000
    with httpx.Client(base_url=b.url, timeout=60) as client:
        assert {r["name"]: r for r in client.get("/api/runs").json()}["race"]["steps"] == 3000


async def _live_across(source, viewer, run: str, steps: np.ndarray) -> dict:
    batch = make_batch(steps, np.random.default_rng(int(steps[0])))
    async with websockets.connect(f"{viewer.ws_url}/ws/live/{run}") as live:
        await asyncio.sleep(0.3)  # subscribed
        async with websockets.connect(f"{source.ws_url}/ws/ingest") as ingest:
            await ingest.send(json.dumps({"type": "batch", "seq": 1, "run": run, "batch": batch}))
            assert json.loads(await ingest.recv())["accepted"] == len(steps)
        pushed = json.loads(await asyncio.wait_for(live.recv(), 15))
    assert pushed["data"]["pre_norm"] == batch["pre_norm"]
    return pushed


def test_live_points_ingested_in_one_process_reach_a_dashboard_on_the_other(two_servers):
    a, b = two_servers
    pushed = asyncio.run(_live_across(a, b, "live-ab", np.arange(0, 20)))
    assert pushed["run"] == "live-ab" and pushed["data"]["step"] == list(range(20))
    pushed = asyncio.run(_live_across(b, a, "live-ba", np.arange(100, 130)))
    assert pushed["data"]["step"] == list(range(100, 130))
