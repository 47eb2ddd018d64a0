"""Run the read paths once on made-up data when the server starts.

The first overview after a start took 35–60 ms longer than the next one on a
run of the same size (`benchmarks/scale_bench.py`: 81–135 ms against
45–78 ms): lazy imports and NumPy's first calls of each ufunc and sort. This
runs those paths once, in memory, on 5,000 synthetic steps (about 50 ms), and opens the
database's first connection, so the first user is not the one who pays.
"""
from __future__ import annotations

import numpy as np

from gradwatch.server.analysis import diagnostics, stats
from gradwatch.server.storage.chunks import MemorySource, overview, series_from_arrays
from gradwatch.server.storage.chunk_rows import KEY, SPEC, arrays_of, pack_rows, summary_blob, unpack_rows
from gradwatch.server.storage.serialise import encode_series


def warm_up(store=None, steps: int = 5_000) -> None:
    """The read paths once on synthetic steps; with a store, also its first connections and the
    schema (one snapshot reading the run list and a summary row)."""
    if store is not None:
        with store.reader.snapshot() as cursor:
            cursor.execute(store.reader.sql("SELECT id FROM runs ORDER BY updated DESC LIMIT 1"))
            cursor.fetchall()
            cursor.execute(store.reader.sql("SELECT data FROM chunk_summaries WHERE run_id = -1"))
            cursor.fetchall()
    rng = np.random.default_rng(0)
    step = np.arange(steps)
    pre = np.exp(rng.normal(size=steps))
    pre[rng.choice(steps, 8, replace=False)] *= 50
    columns = {"pre_norm": (pre, None), "threshold": (np.ones(steps), None),
               "clipped": ((pre > 1.0).astype(float), None), "spike": ((pre > 20).astype(float), None)}
    chunks = series_from_arrays(step, SPEC, columns)
    source = MemorySource(SPEC, KEY)
    for chunk in chunks:
        source.put(chunk)
        summary_blob(chunk)
        unpack_rows(chunk.chunk_id, pack_rows(chunk), ("pre_norm",))
    fields = ("pre_norm", "threshold", "clipped", "spike", "nonfinite")
    series = overview(source, SPEC, 0, steps - 1, 500, fields, key=KEY)
    encode_series(series.steps, series.values, series.missing, ("step",) + fields)
    _, values, _ = arrays_of(chunks, ("pre_norm", "clipped", "nonfinite"))
    stats.window_stats(values["pre_norm"], values["clipped"], values["nonfinite"])
    diagnostics.recommend(step, pre)


async def warm_request(app, path: str = "/api/runs/gradwatch-warm-up/series") -> None:
    """One GET through the app's own ASGI stack (routing, validation, dependencies, the error
    handler of an unknown run), as the first real request would go, without a socket."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"points=2000",
             "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
             "root_path": ""}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        return None

    await app(scope, receive, send)
