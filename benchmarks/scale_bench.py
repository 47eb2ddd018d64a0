"""Storage at a team's scale: many long runs, a restarted server, cold reads, reads under ingest.

    python benchmarks/scale_bench.py [--runs 20] [--steps 1000000] [--tensor-runs 4]
        [--tensor-steps 250000] [--tensors 64] [--db PATH] [--cache-mb 128] [--quick]

1. Load (skipped when `--db` names a database this benchmark built before):
   `--runs` runs of `--steps` steps (every column an MLX agent sends, float32
   norms, a spike every ~1,000 steps, a few NaN/Inf) and `--tensor-runs` runs of
   `--tensor-steps` steps with `--tensors` per-tensor norms, stored in-process
   through `Store.ingest` in 16,384-step batches (the server's own ingest path
   without HTTP).
2. A new `gradwatch serve` process on that database (the OS page cache may be
   warm, as after a real restart).
3. Per run, over HTTP on one keep-alive connection: the first series
   (2,000 points), stats and the recommendation, the same three again, and for
   the tensor runs the heatmap (500 points) and the grouped heatmap.
4. Reads (series + stats of random runs) while 4 writers each ingest 2,000
   steps/s into runs of their own (200-step batches, 10 a second).
5. Server RSS (now and peak), database bytes per stored step.

Goals (issue 12): first overview of a 1M-step run <= 100 ms, stats and
recommendation <= 150 ms, read p99 <= 250 ms during the ingest, RSS <= 400 MB.
The machine is shared and noisy: medians and p99 are printed, never asserted.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import ServerProcess  # noqa: E402

LOAD_BATCH = 16_384
MARKER = "scale_bench"   # runs.meta key: the database was built by this benchmark, with these sizes


def columns(steps: np.ndarray, rng: np.random.Generator) -> dict:
    n = len(steps)
    pre = np.exp(rng.normal(-0.3, 0.25, n)).astype(np.float32)
    spike = rng.random(n) < 0.001
    pre[spike] *= 25.0
    bad = rng.random(n) < 2e-6
    pre[bad] = np.nan
    threshold = np.float32(1.0)
    clipped = pre > threshold
    post = np.where(clipped, threshold, pre).astype(np.float32)
    scale = np.where(clipped, threshold / pre, 1.0).astype(np.float32)
    loss = (3.0 - np.log1p(steps) / 10 + rng.normal(0, 0.05, n)).astype(np.float32)
    out = {"step": steps.tolist(), "pre_norm": pre.tolist(), "post_norm": post.tolist(),
           "scale": scale.tolist(), "threshold": [1.0] * n, "clipped": clipped.tolist(),
           "loss": loss.tolist(), "lr": [3e-4] * n, "spike": spike.tolist(),
           "nonfinite": (~np.isfinite(pre)).tolist(), "time": (1.79e9 + steps * 0.05).tolist(),
           "robust_z": rng.normal(0, 1, n).astype(np.float32).tolist()}
    for key in ("pre_norm", "post_norm", "scale"):
        out[key] = ["NaN" if v != v else v for v in out[key]]
    return out


def tensor_names(count: int) -> list[str]:
    per_block = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight")
    return [f"model.layers.{i // len(per_block)}.{per_block[i % len(per_block)]}" for i in range(count)]


def load(db_url: str, args) -> None:
    from gradwatch.server.wire import parse_batch
    from gradwatch.server.storage import Store, create_schema, make_engine

    engine = make_engine(db_url)
    create_schema(engine)
    store = Store(engine)
    rng = np.random.default_rng(0)
    names = tensor_names(args.tensors)
    plan = [(f"run-{i:02d}", args.steps, False) for i in range(args.runs)] + \
           [(f"tensors-{i:02d}", args.tensor_steps, True) for i in range(args.tensor_runs)]
    started = time.perf_counter()
    total = 0
    for index, (run, steps, with_tensors) in enumerate(plan):
        for begin in range(0, steps, LOAD_BATCH):
            block = np.arange(begin, min(begin + LOAD_BATCH, steps))
            body = columns(block, rng)
            if with_tensors:
                norms = np.exp(rng.normal(-3, 0.5, (len(block), len(names)))).astype(np.float32)
                body["tensor_norms"] = {"names": names, "norms": norms.tolist()}
            store.ingest(run, parse_batch(body))
            total += len(block)
        elapsed = time.perf_counter() - started
        print(f"  loaded {run} ({index + 1}/{len(plan)}): {total:,} steps, {total / elapsed:,.0f} steps/s",
              file=sys.stderr, flush=True)
    store.ingest(plan[0][0], None, meta={MARKER: {"runs": args.runs, "steps": args.steps,
                                                  "tensor_runs": args.tensor_runs,
                                                  "tensor_steps": args.tensor_steps, "tensors": args.tensors}})
    engine.dispose()


def built_before(db_path: Path, args) -> bool:
    import sqlite3

    if not db_path.exists():
        return False
    try:
        with sqlite3.connect(db_path) as connection:
            row = connection.execute("SELECT meta FROM runs WHERE name = 'run-00'").fetchone()
    except sqlite3.Error:
        return False
    return bool(row) and json.loads(row[0]).get(MARKER) == {
        "runs": args.runs, "steps": args.steps, "tensor_runs": args.tensor_runs,
        "tensor_steps": args.tensor_steps, "tensors": args.tensors}


class Client:
    def __init__(self, url: str):
        host, port = url.split("//")[1].rstrip("/").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)

    def get(self, path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        return elapsed * 1000, body

    def post(self, path: str, body: bytes) -> None:
        self.connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        text = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: {response.status} {text[:200]!r}")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def per_run_reads(client: Client, runs: list[str], tensor_runs: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {key: [] for key in ("series", "stats", "recommendation", "series again",
                                                         "stats again", "recommendation again", "heatmap",
                                                         "heatmap by module")}
    for run in runs + tensor_runs:
        base = f"/api/runs/{run}"
        for suffix in ("", " again"):
            times["series" + suffix].append(client.get(base + "/series?points=2000")[0])
            times["stats" + suffix].append(client.get(base + "/stats")[0])
            times["recommendation" + suffix].append(client.get(base + "/recommendation")[0])
        if run in tensor_runs:
            times["heatmap"].append(client.get(base + "/tensors?points=500")[0])
            times["heatmap by module"].append(client.get(base + "/tensors?points=500&group=module")[0])
    return times


def reads_under_ingest(url: str, runs: list[str], seconds: float, writers: int = 4) -> tuple[list[float], int]:
    stop = threading.Event()
    stored = [0] * writers
    rng = np.random.default_rng(7)

    tag = f"{os.getpid()}-{int(time.time())}"   # fresh runs each time a reused database is read

    def write(index: int) -> None:
        client = Client(url)
        step = 0
        next_at = time.perf_counter()
        while not stop.is_set():
            block = np.arange(step, step + 200)
            client.post(f"/api/runs/writer-{tag}-{index}/steps", json.dumps(columns(block, rng)).encode())
            step += 200
            stored[index] += 200
            next_at += 0.1
            time.sleep(max(next_at - time.perf_counter(), 0))

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writers)]
    for thread in threads:
        thread.start()
    reader = Client(url)
    latencies: list[float] = []
    pick = np.random.default_rng(3)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run = runs[int(pick.integers(len(runs)))]
        latencies.append(reader.get(f"/api/runs/{run}/series?points=2000")[0])
        latencies.append(reader.get(f"/api/runs/{run}/stats")[0])
    stop.set()
    for thread in threads:
        thread.join(30)
    for index in range(writers):   # leave a reused database as it was built
        reader.connection.request("DELETE", f"/api/runs/writer-{tag}-{index}")
        reader.connection.getresponse().read()
    return latencies, sum(stored)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tensor-runs", type=int, default=4)
    parser.add_argument("--tensor-steps", type=int, default=250_000)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--db", type=Path, help="SQLite file to build once and reuse")
    parser.add_argument("--cache-mb", type=float, default=128)
    parser.add_argument("--ingest-seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="4 x 100,000 steps + 1 x 50,000 with tensors")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.steps, args.tensor_runs, args.tensor_steps = 4, 100_000, 1, 50_000
        args.ingest_seconds = min(args.ingest_seconds, 8.0)
    workdir = Path(tempfile.mkdtemp(prefix="gradwatch-scale-"))
    db_path = args.db or workdir / "scale.db"
    db_url = f"sqlite:///{db_path}"
    if built_before(db_path, args):
        print(f"reusing {db_path}", file=sys.stderr)
    else:
        if db_path.exists():
            db_path.unlink()
        started = time.perf_counter()
        load(db_url, args)
        print(f"loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    runs = [f"run-{i:02d}" for i in range(args.runs)]
    tensor_runs = [f"tensors-{i:02d}" for i in range(args.tensor_runs)]
    stored_steps = args.runs * args.steps + args.tensor_runs * args.tensor_steps
    db_bytes = sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*"))
    server = ServerProcess(db_url, extra_args=["--cache-mb", str(args.cache_mb)], log_path=workdir / "server.log")
    server.start(timeout=120)
    try:
        client = Client(server.url)
        times = per_run_reads(client, runs, tensor_runs)
        rss_after_reads = rss_mb(server.process.pid)
        latencies, ingested = reads_under_ingest(server.url, runs, args.ingest_seconds)
        rss_now, rss_peak = rss_mb(server.process.pid)
    finally:
        server.stop()
    print(f"\n{args.runs} runs x {args.steps:,} steps + {args.tensor_runs} x {args.tensor_steps:,} with "
          f"{args.tensors} tensor norms; SQLite; cache {args.cache_mb:g} MB; server restarted before reading\n")
    print(f"{'read (ms)':24} {'median':>8} {'p90':>8} {'max':>8}   goal")
    goals = {"series": "<= 100 (first overview)", "stats": "<= 150", "recommendation": "<= 150"}
    for key, values in times.items():
        if values:
            print(f"{key:24} {statistics.median(values):8.1f} {percentile(values, 90):8.1f} "
                  f"{max(values):8.1f}   {goals.get(key, '')}")
    print(f"\nreads during ingest by 4 writers ({ingested / args.ingest_seconds:,.0f} steps/s stored): "
          f"{len(latencies)} reads, p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms "
          f"(goal p99 <= 250)")
    print(f"server RSS after the reads {rss_after_reads[0]:.0f} MB (peak so far {rss_after_reads[1]:.0f}), "
          f"at the end {rss_now:.0f} MB, peak {rss_peak:.0f} MB (goal <= 400)")
    print(f"database {db_bytes / 2**20:,.0f} MB for {stored_steps:,} steps: {db_bytes / stored_steps:.1f} bytes "
          f"per step (tensor norms included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
