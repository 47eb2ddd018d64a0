"""The overview of a 1M-step run read cold, then again (the dashboard's zoom-out and refetch).

    python benchmarks/warm_read_bench.py [--steps N] [--points P] [--reads R] [--against-path DIR]

Builds an N-step run (default 1,000,000, every column the agent sends, a few spikes and
non-finite steps) through `Store.ingest` into a fresh SQLite file, then:

- server-side: a fresh `Store` on that file (cold: nothing decoded yet); `overview` of the
  whole run at `--points` read `--reads` times (default 6): read 1 is the cold one, the
  median of reads 2..R the warm figure; the same after an append of 2,000 steps (the
  cached summaries refreshed by the chunks written since, not read again);
- over HTTP: `gradwatch serve` on the same file, `GET /api/runs/{run}/series?points=P`
  R times (first request cold), and the server's peak RSS (VmHWM) against `--cache-mb`.

`--against-path DIR` (a folder with an importable `gradwatch` of another commit, as in
`benchmarks/ingest_profile.py`) runs the same server-side reads with that commit too, in
alternation with the working tree (each a fresh process on the same database file), and
prints both. The machine is shared and loaded: medians, and alternate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIELDS = ("pre_norm", "post_norm", "threshold", "clipped", "loss", "spike", "nonfinite")


@dataclass
class Column:
    values: np.ndarray
    missing: np.ndarray | None = None


@dataclass
class Batch:
    """A validated batch as the wire layer hands it to the store."""

    steps: np.ndarray
    columns: dict
    tensor_names: list | None = None
    tensor_norms: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)


def batches(first: int, steps: int, size: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    for begin in range(first, first + steps, size):
        step = np.arange(begin, min(begin + size, first + steps), dtype=np.int64)
        n = len(step)
        pre = np.exp(rng.normal(0.0, 0.3, n))
        pre[rng.random(n) < 0.0005] *= 30.0
        pre[rng.random(n) < 0.0001] = np.nan
        threshold = np.full(n, 1.5)
        scale = np.minimum(threshold / (pre + 1e-6), 1.0)
        yield Batch(step, {
            "pre_norm": Column(pre), "post_norm": Column(pre * scale), "scale": Column(scale),
            "threshold": Column(threshold), "clipped": Column((pre > threshold).astype(float)),
            "loss": Column(3.0 * np.exp(-step / 1e6) + rng.normal(0, 0.01, n)), "lr": Column(np.full(n, 3e-4)),
            "z": Column(rng.normal(0, 1, n)), "ema": Column(pre.copy()),
            "spike": Column((pre > 10).astype(float)), "nonfinite": Column((~np.isfinite(pre)).astype(float)),
            "time": Column(1.7e9 + step * 0.01)})


def build(path: Path, steps: int) -> None:
    from gradwatch.server.storage import Store, create_schema, make_engine

    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    store = Store(engine)
    for batch in batches(0, steps):
        store.ingest("big", batch)
    engine.dispose()


READER = r"""
import json, sys, time
import numpy as np
from gradwatch.server.storage import Store, make_engine
path, points, reads, append = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
fields = tuple(json.loads(sys.argv[5]))
engine = make_engine(f"sqlite:///{path}")
store = Store(engine)
run_id = store.run_id("big")
def timed():
    out = []
    for _ in range(reads):
        t = time.perf_counter()
        found = store.overview(run_id, None, None, points, fields)
        out.append((time.perf_counter() - t) * 1000)
    return out, found
first, found = timed()
result = {"reads": first, "rows": len(found.steps), "total": found.total}
if append:
    sys.path.insert(0, sys.argv[6])
    from benchmarks.warm_read_bench import batches
    last = store.reader.step_range(run_id)[1]
    for batch in batches(last + 1, 2000, seed=1):
        store.ingest("big", batch)
    again, found2 = timed()
    result["after_append"] = again
    result["rows_after"] = len(found2.steps)
    result["total_after"] = found2.total
print(json.dumps(result))
"""


def server_side(path: Path, points: int, reads: int, pythonpath: str | None, append: bool) -> dict:
    """Reads in a fresh process (cold caches of ours; the OS page cache is warm for both)."""
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # the append changes the database: measure it on a copy
    work = path
    if append:
        work = path.with_name(path.stem + "-append.db")
        _copy_db(path, work)
    out = subprocess.run([sys.executable, "-c", READER, str(work), str(points), str(reads), "1" if append else "0",
                          json.dumps(FIELDS), str(ROOT)], env=env, capture_output=True, text=True, check=True)
    if append:
        for suffix in ("", "-wal", "-shm"):
            Path(str(work) + suffix).unlink(missing_ok=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _copy_db(source: Path, target: Path) -> None:
    import sqlite3
    with sqlite3.connect(source) as a, sqlite3.connect(target) as b:
        a.backup(b)


def over_http(path: Path, points: int, reads: int, cache_mb: int) -> dict:
    from tests.procs import ServerProcess

    with ServerProcess(f"sqlite:///{path}", extra_args=["--cache-mb", str(cache_mb)]) as server:
        url = f"{server.url}/api/runs/big/series?points={points}&fields={','.join(FIELDS)}"
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        started_rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
        times = []
        for _ in range(reads):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as answer:
                body = answer.read()
            times.append((time.perf_counter() - started) * 1000)
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    return {"reads": times, "bytes": len(body), "peak_rss_mb": peak, "start_rss_mb": started_rss}


def median(values: list[float]) -> float:
    return float(np.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3, help="server-side runs (fresh processes), alternating")
    parser.add_argument("--cache-mb", type=int, default=128)
    parser.add_argument("--against-path")
    parser.add_argument("--no-http", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "warm.db"
        started = time.perf_counter()
        build(path, options.steps)
        print(f"built a {options.steps:,}-step run in {time.perf_counter() - started:.1f} s")
        configs = [("working tree", None)]
        if options.against_path:
            configs.insert(0, (options.against_path, str(Path(options.against_path).resolve())))
        results: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for _ in range(options.repeat):
            for name, pythonpath in configs:
                results[name].append(server_side(path, options.points, options.reads, pythonpath, append=True))
        print(f"server-side overview of {options.steps:,} steps at {options.points} points, "
              f"{options.reads} reads per fresh process, {options.repeat} processes (ms):")
        for name, runs in results.items():
            cold = median([r["reads"][0] for r in runs])
            warm = median([x for r in runs for x in r["reads"][1:]])
            line = f"  {name:<14} cold {cold:7.1f}  warm (reads 2-{options.reads}) {warm:6.1f}"
            if "after_append" in runs[0]:
                first_after = median([r["after_append"][0] for r in runs])
                warm_after = median([x for r in runs for x in r["after_append"][1:]])
                line += f"  after a 2,000-step append: first {first_after:6.1f}, then {warm_after:6.1f}"
            print(line + f"  ({runs[0]['rows']} rows of {runs[0]['total']:,})")
        if not options.no_http:
            http = over_http(path, options.points, options.reads, options.cache_mb)
            print(f"HTTP GET /series (working tree, --cache-mb {options.cache_mb}): first {http['reads'][0]:.1f} ms, "
                  f"reads 2-{options.reads} median {median(http['reads'][1:]):.1f} ms, {http['bytes']:,} bytes; "
                  f"server RSS {http['start_rss_mb']:.0f} MB once started, peak {http['peak_rss_mb']:.0f} MB "
                  f"(+{http['peak_rss_mb'] - http['start_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
