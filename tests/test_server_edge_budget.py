"""Ingest parsing memory is bounded: concurrent large bodies wait their turn.

The app in-process (httpx's ASGI transport, the real routes and a real SQLite file):
each stored batch is held inside the store until every request has either started
parsing or is waiting, so the counts say how many were parsed at once, with no clock.
"""
from __future__ import annotations

import asyncio
import threading

import httpx
import orjson

from gradwatch.server.app import create_app
from gradwatch.server.settings import Settings

MAX_BODY = 200_000


def big_body(n_steps: int) -> bytes:
    return orjson.dumps({"step": list(range(n_steps)), "pre_norm": [1.0 + i / 7 for i in range(n_steps)]})


def test_concurrent_bodies_are_parsed_at_most_two_full_bodies_at_a_time(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'budget.db'}", max_body=MAX_BODY))
    store, budget = app.state.store, app.state.parse_budget
    body = big_body(7_000)
    assert 0.5 * MAX_BODY < len(body) <= MAX_BODY  # two fit in 2 x max_body, three do not
    n = 8
    release = threading.Event()
    real_ingest = store.ingest

    def held_ingest(*args, **kwargs):
        release.wait(60)
        return real_ingest(*args, **kwargs)

    store.ingest = held_ingest

    async def go():
        everyone_placed = asyncio.Event()
        seen: list[tuple[int, int]] = []

        def watch(b):
            seen.append((b.holders, b.waiting))
            if b.holders + b.waiting == n and b.holders == 2:
                everyone_placed.set()

        budget.on_change.append(watch)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            posts = [asyncio.create_task(client.post(f"/api/runs/budget-{i}/steps", content=body,
                                                     headers={"content-type": "application/json"}))
                     for i in range(n)]
            await asyncio.wait_for(everyone_placed.wait(), 60)  # a guard, not a synchronisation
            release.set()
            answers = await asyncio.gather(*posts)
        return answers, seen

    answers, seen = asyncio.run(go())
    assert [a.status_code for a in answers] == [200] * n
    assert all(a.json()["accepted"] == 7_000 for a in answers)
    assert budget.peak_holders == 2 and max(h for h, _ in seen) == 2
    assert max(w for _, w in seen) == n - 2       # six bodies waited their turn
    assert budget.peak_bytes == 2 * len(body) <= 2 * MAX_BODY
    assert budget.holders == budget.waiting == budget.in_use == 0
    assert sorted(run["name"] for run in store.list_runs()) == sorted(f"budget-{i}" for i in range(n))


def test_small_bodies_share_the_budget():
    """Sixteen 10 kB bodies fit in 2 x 200 kB at once: nobody waits."""
    from gradwatch.server.security import ByteBudget

    budget = ByteBudget(2 * MAX_BODY)
    gate = asyncio.Event

    async def go():
        inside = 0
        opened = gate()
        all_in = gate()

        async def one():
            nonlocal inside
            async with budget.hold(10_000):
                inside += 1
                if inside == 16:
                    all_in.set()
                await opened.wait()

        tasks = [asyncio.create_task(one()) for _ in range(16)]
        await asyncio.wait_for(all_in.wait(), 30)
        opened.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert budget.peak_holders == 16 and budget.peak_bytes == 160_000 and budget.in_use == 0
