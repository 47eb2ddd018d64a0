"""Read latency on a 1,000,000-step run: downsampled series, stats, recommendation.

Starts `gradwatch serve` on a fresh SQLite file, stores a 1,000,000-step run
(with spikes and a few non-finite norms) through the HTTP ingest, then times
each read over HTTP on a warm server (after one untimed request that fills the
server's cache) and prints the median and the slowest of the repeats.
Goals: series to 2,000 points <= 150 ms, stats <= 150 ms, recommendation <= 150 ms.

    python benchmarks/server_bench.py [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ingest_bench import make_batches, post_all  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402

GOAL_MS = 150.0
READS = {
    "series_2000_points": ("/api/runs/big/series", {"points": 2000}),
    "stats": ("/api/runs/big/stats", {}),
    "recommendation": ("/api/runs/big/recommendation", {}),
    "recommendation_window_5000": ("/api/runs/big/recommendation", {"window": 5000}),
    "histogram": ("/api/runs/big/histogram", {}),
}


def time_reads(url: str, repeats: int) -> dict[str, dict[str, float]]:
    figures = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, (path, params) in READS.items():
            first_started = time.perf_counter()
            client.get(path, params=params).raise_for_status()
            cold_ms = (time.perf_counter() - first_started) * 1000
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                answer = client.get(path, params=params)
                answer.raise_for_status()
                _ = answer.content
                times.append((time.perf_counter() - started) * 1000)
            figures[name] = {"median_ms": statistics.median(times), "max_ms": max(times), "first_ms": cold_ms}
    return figures


def main(steps: int = 1_000_000, repeats: int = 15) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        with ServerProcess(f"sqlite:///{Path(folder) / 'bench.db'}") as server:
            started = time.perf_counter()
            post_all(server.port, "big", make_batches(steps, 5000, encoding="msgpack"),  # the agent's encoding
                     media_type="application/msgpack")
            ingest_s = time.perf_counter() - started
            reads = time_reads(server.url, repeats)
    figures: dict[str, float | int | str] = {"steps": steps, "ingest_s": round(ingest_s, 2)}
    print(f"server: {steps:,}-step run stored in {ingest_s:.1f} s; reads over HTTP on a warm server "
          f"(median / max of {repeats}; first request fills the cache):")
    for name, timing in reads.items():
        figures[f"{name}_ms"] = round(timing["median_ms"], 1)
        figures[f"{name}_max_ms"] = round(timing["max_ms"], 1)
        figures[f"{name}_first_ms"] = round(timing["first_ms"], 1)
        verdict = "" if name not in ("series_2000_points", "stats", "recommendation") else \
            ("  (goal <= 150 ms: met)" if timing["median_ms"] <= GOAL_MS else "  (goal <= 150 ms: MISSED)")
        print(f"  {name:<28} {timing['median_ms']:7.1f} ms median, {timing['max_ms']:7.1f} ms max, "
              f"first {timing['first_ms']:7.1f} ms{verdict}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    main(options.steps, options.repeats)
