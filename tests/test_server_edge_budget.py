"""Ingest parsing memory is bounded: concurrent large bodies wait their turn.

The app in-process (httpx's ASGI transport, the real routes and a real SQLite file):
each stored batch is held inside the store until the others are waiting, so the
counts say how many were parsed at once, with no clock. The budget is charged as
bytes arrive (and a JSON body again for its parse, server/wire), never from a
declared length; the stalled-body cases run through a real server in
tests/test_server_edge_stall.py.
"""
from __future__ import annotations

import asyncio
import threading

import httpx
import orjson

from gradwatch.server.app.factory import create_app
from gradwatch.server.app.settings import Settings

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
            if b.waiting >= n - 2:   # the rest wait (a holder may wait too, for its parse charge)
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
    assert budget.peak_holders <= 2 and max(h for h, _ in seen) <= 2
    assert max(w for _, w in seen) >= n - 2       # at least six bodies waited their turn
    assert 2 * len(body) <= budget.peak_bytes <= 2 * budget.capacity  # the oldest may overdraw, once
    assert budget.holders == budget.waiting == budget.in_use == 0
    assert sorted(run["name"] for run in store.list_runs()) == sorted(f"budget-{i}" for i in range(n))


def test_small_bodies_share_the_budget():
    """Sixteen 10 kB bodies fit in 2 x 200 kB at once: nobody waits."""
    from gradwatch.server.app.security import ByteBudget

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


def test_two_half_read_bodies_never_wait_on_each_other():
    """A and B each hold 40% and want 40% more: the oldest (A) goes first, B waits for it;
    without that rule both would wait for ever."""
    from gradwatch.server.app.security import ByteBudget

    budget = ByteBudget(1000)
    order: list[str] = []

    async def go():
        async def a_body(a_in, b_in):
            async with budget.hold(400) as hold:
                a_in.set()
                await b_in.wait()
                await hold.grow(400)          # 1200 > 1000, but A is the oldest holder
                order.append("a grown")
                await asyncio.sleep(0)

        async def b_body(a_in, b_in):
            await a_in.wait()
            async with budget.hold(400) as hold:
                b_in.set()
                await hold.grow(400)          # waits until A has given its 800 back
                order.append(f"b grown, {budget.in_use} in use")   # A's bytes are back

        a_in, b_in = asyncio.Event(), asyncio.Event()
        await asyncio.wait_for(asyncio.gather(a_body(a_in, b_in), b_body(a_in, b_in)), 30)

    asyncio.run(go())
    assert order == ["a grown", "b grown, 800 in use"]
    assert budget.peak_bytes == 1200 and budget.in_use == budget.holders == budget.waiting == 0


def test_a_request_is_charged_the_bytes_it_sent_not_what_it_declared(tmp_path):
    """One chunk of 1 byte under a declared 8 MiB: the budget holds 1 byte, then 408."""
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'declared.db'}", body_idle_timeout=0.2))
    budget = app.state.parse_budget
    charged: list[int] = []
    budget.on_change.append(lambda b: charged.append(b.in_use))
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"{", "more_body": True}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()   # the client sends nothing more

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/runs/declared/steps", "raw_path": b"/api/runs/declared/steps",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(8 << 20).encode())]}

    async def go():
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(go())
    assert max(charged) == 1 and budget.in_use == 0
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
