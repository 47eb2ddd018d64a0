"""Ingest throughput: columnar 2,000-step batches over one keep-alive HTTP connection.

Starts `gradwatch serve` itself on a fresh SQLite file, posts a run of
generated steps (every column the agent sends, a few clips and spikes), and
prints steps stored per second, measured from the first request to the last
answer (each answer is sent after its transaction commits), and the ratio to
MLflow 3.17's `log_batch` into SQLite on this machine (5,170 points/s).

    python benchmarks/ingest_bench.py [--steps N] [--batch B] [--repeat R]

The machine is shared and noisy: `--repeat 5` reports the median of five runs.
"""
from __future__ import annotations

import argparse
import http.client
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import ServerProcess  # noqa: E402

MLFLOW_POINTS_PER_S = 5170.0


def make_batches(steps: int, batch: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    pre = np.exp(rng.normal(0.0, 0.3, steps))
    pre[rng.choice(steps, max(steps // 1000, 1), replace=False)] *= 20.0
    threshold = np.full(steps, 1.5)
    clipped = pre > threshold
    scale = np.minimum(threshold / (pre + 1e-6), 1.0)
    loss = 3.0 * np.exp(-np.arange(steps) / steps) + rng.normal(0, 0.01, steps)
    z = rng.normal(0, 1, steps)
    bodies = []
    start_time = time.time()
    for begin in range(0, steps, batch):
        part = slice(begin, min(begin + batch, steps))
        bodies.append(orjson.dumps({
            "step": list(range(part.start, part.stop)),
            "pre_norm": pre[part].tolist(), "post_norm": (pre[part] * scale[part]).tolist(),
            "scale": scale[part].tolist(), "threshold": threshold[part].tolist(),
            "clipped": clipped[part].tolist(), "loss": loss[part].tolist(),
            "lr": [3e-4] * (part.stop - part.start), "z": z[part].tolist(),
            "ema": pre[part].tolist(), "spike": (pre[part] > 10).tolist(),
            "nonfinite": [False] * (part.stop - part.start),
            "time": (start_time + np.arange(part.start, part.stop) * 0.01).tolist(),
        }))
    return bodies


def post_all(port: int, run: str, bodies: list[bytes]) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    for body in bodies:
        connection.request("POST", f"/api/runs/{run}/steps", body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"ingest answered {answer.status}: {payload[:200]!r}")
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def run_once(bodies: list[bytes], steps: int) -> float:
    """Seconds to store `bodies` into a fresh SQLite file through a fresh server."""
    with tempfile.TemporaryDirectory() as folder:
        db_path = Path(folder) / "bench.db"
        with ServerProcess(f"sqlite:///{db_path}") as server:
            post_all(server.port, "warmup", bodies[:5])
            elapsed = post_all(server.port, "bench", bodies)
        with sqlite3.connect(db_path) as check:
            stored = check.execute("SELECT SUM(n) FROM chunks JOIN runs ON runs.id = chunks.run_id "
                                   "WHERE runs.name = 'bench'").fetchone()[0]
    if stored != steps:
        raise RuntimeError(f"stored {stored} steps, sent {steps}")
    return elapsed


def main(steps: int = 400_000, batch: int = 2000, repeat: int = 1) -> dict:
    bodies = make_batches(steps, batch)
    times = []
    for attempt in range(repeat):
        times.append(run_once(bodies, steps))
        if repeat > 1:
            print(f"  run {attempt + 1}/{repeat}: {steps / times[-1]:,.0f} steps/s", flush=True)
    elapsed = sorted(times)[len(times) // 2]  # the median run (the upper one of an even count)
    rate = steps / elapsed
    figures = {"steps": steps, "batch": batch, "seconds": round(elapsed, 3),
               "steps_per_s": round(rate), "vs_mlflow_log_batch": round(rate / MLFLOW_POINTS_PER_S, 1),
               "batch_ms": round(elapsed / len(bodies) * 1000, 2),
               "body_bytes_per_step": round(sum(map(len, bodies)) / steps, 1), "runs": repeat}
    print(f"ingest: {steps:,} steps in {len(bodies)} batches of {batch:,} over one HTTP connection "
          f"into SQLite: {elapsed:.2f} s, {rate:,.0f} steps/s stored "
          f"({rate / MLFLOW_POINTS_PER_S:.1f}x MLflow 3.17 log_batch's {MLFLOW_POINTS_PER_S:,.0f} points/s), "
          f"{figures['batch_ms']} ms per batch" + (f" (median of {repeat} runs)" if repeat > 1 else ""))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run N times (a fresh server and database each) and report the median run")
    options = parser.parse_args()
    main(options.steps, options.batch, max(options.repeat, 1))
