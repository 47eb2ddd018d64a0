"""A run's stored `meta` has a total cap (MAX_RUN_META_BYTES), through a real server's
`/ws/ingest`: messages that add keys are merged until the merge would pass the cap; that
message is refused whole (413, naming the limit; its batch not stored either), a message
that changes nothing past the cap is still acked, and `GET /api/runs` answers without meta
while `GET /api/runs/{run}` has it as merged."""
from __future__ import annotations

import asyncio
import json

import httpx
import orjson
import websockets

from gradwatch.server.storage import MAX_RUN_META_BYTES
from tests.test_server_support import start_server

VALUE = "x" * 60_000   # each key's value: under the 64 KiB a message's meta may hold


async def _session(url: str, messages: list[dict]) -> list[dict]:
    replies = []
    async with websockets.connect(f"{url}/ws/ingest") as ws:
        for message in messages:
            await ws.send(json.dumps(message))
            replies.append(json.loads(await ws.recv()))
    return replies


def test_meta_is_capped_per_run_and_a_refused_message_stores_nothing(tmp_path):
    # how many 60 kB keys fit, computed from the JSON the server stores (orjson, no spaces)
    merged: dict = {}
    fits = 0
    while len(orjson.dumps({**merged, f"k{fits}": VALUE})) <= MAX_RUN_META_BYTES:
        merged[f"k{fits}"] = VALUE
        fits += 1
    assert 10 < fits < 30
    messages = [{"type": "batch", "seq": i, "run": "meta-run", "meta": {f"k{i}": VALUE},
                 "batch": {"step": [i], "pre_norm": [1.0]}} for i in range(fits)]
    over = {"type": "batch", "seq": fits, "run": "meta-run", "meta": {f"k{fits}": VALUE},
            "batch": {"step": [fits], "pre_norm": [1.0]}}
    same_again = {"type": "batch", "seq": fits + 1, "run": "meta-run", "meta": {"k0": VALUE},
                  "batch": {"step": [fits + 1], "pre_norm": [1.0]}}
    smaller = {"type": "batch", "seq": fits + 2, "run": "meta-run", "meta": {"k1": "short"}}
    server = start_server(f"sqlite:///{tmp_path / 'meta.db'}", tmp_path)
    try:
        replies = asyncio.run(_session(server.ws_url, messages + [over, same_again, smaller]))
        assert [r["type"] for r in replies[:fits]] == ["ack"] * fits
        refused = replies[fits]
        assert refused["type"] == "error" and refused["seq"] == fits and refused["status"] == 413
        assert str(MAX_RUN_META_BYTES) in refused["detail"] and "meta" in refused["detail"]
        assert replies[fits + 1] == {"type": "ack", "seq": fits + 1, "accepted": 1, "duplicates": 0,
                                     "conflicts": 0}
        assert replies[fits + 2]["type"] == "ack"
        merged["k1"] = "short"
        with httpx.Client(base_url=server.url) as client:
            listed = {run["name"]: run for run in client.get("/api/runs").json()}["meta-run"]
            assert "meta" not in listed
            assert listed["steps"] == fits + 1          # the refused message's step was not stored
            run = client.get("/api/runs/meta-run").json()
            assert run["meta"] == merged and run["steps"] == fits + 1
            steps = client.get("/api/runs/meta-run/series", params={"fields": "pre_norm"}).json()["step"]
            assert fits not in steps and fits + 1 in steps
    finally:
        server.stop()
