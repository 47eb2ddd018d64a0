"""Where an ingest batch's time goes on the storage side, and main against an older commit over HTTP.

    python benchmarks/ingest_profile.py [--steps N] [--batch B] [--profile] [--top K]
    python benchmarks/ingest_profile.py --http --against-path DIR [--path DIR2] [--repeat R]

- default: the 11-column 2,000-step batches of `benchmarks/ingest_bench.py`, parsed once
  (`server/parse.py`, outside the timing), then stored one after another through
  `Store.ingest` into a fresh SQLite file in this process: ms per batch and steps/s of the
  storage side alone; `--profile` runs it under cProfile and prints the `--top` functions
  by cumulative and by own time.
- `--http --against-path DIR`: DIR is a folder holding an importable `gradwatch` package of
  another commit (e.g. a `git worktree` of the release 3c20f55 with `gradwatch/server ->
  worktree/server` links); a fresh server of that commit (`PYTHONPATH=DIR`) and of the
  working tree are started in turn, `--repeat` times, alternating, each posting the same
  bodies on one keep-alive connection; prints each one's median steps/s, the server's CPU
  per batch (all its threads, from /proc) and the ratios. `--path DIR2` measures another
  such folder instead of the working tree.
  The machine is shared: take the medians, and alternate (drift hits both alike).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ingest_bench import WARMUP_BATCHES, make_batches, post_all  # noqa: E402


def storage_side(steps: int, batch: int, profile: bool, top: int) -> dict:
    from gradwatch.server.wire.json_decode import load_batch
    from gradwatch.server.storage.engine import make_engine
    from gradwatch.server.storage.migrate import create_schema
    from gradwatch.server.storage.store import Store

    bodies = make_batches(steps, batch)
    batches = [load_batch(body) for body in bodies]
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'profile.db'}"
        engine = make_engine(url)
        create_schema(engine)
        store = Store(engine)
        for item in batches[:WARMUP_BATCHES]:
            store.ingest("warmup", item)
        profiler = cProfile.Profile() if profile else None
        times = []
        if profiler:
            profiler.enable()
        for item in batches:
            started = time.perf_counter()
            store.ingest("run", item)
            times.append(time.perf_counter() - started)
        if profiler:
            profiler.disable()
        engine.dispose()
    total = sum(times)
    ordered = sorted(times)
    print(f"storage side: {len(batches)} batches x {batch:,} steps: {total:.2f} s, "
          f"{steps / total:,.0f} steps/s, median {ordered[len(ordered) // 2] * 1000:.2f} ms per batch")
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
    return {"seconds": total, "steps_per_s": steps / total}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_against(path: str, steps: int, batch: int, repeat: int, candidate: str | None = None) -> dict:
    """Steps/s and server CPU ms per batch of the commit at `path` and of `candidate` (another
    such folder; default: the working tree), alternating. CPU per batch is the steadier figure
    on a loaded machine: it does not count time the server waited for a core."""
    from tests.procs import ServerProcess

    bodies = make_batches(steps, batch)
    configs = {"against": {"PYTHONPATH": str(Path(path).resolve())},
               "candidate": {"PYTHONPATH": str(Path(candidate).resolve())} if candidate else {}}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for attempt in range(repeat):
        for name, env in configs.items():
            saved = os.environ.get("PYTHONPATH")
            os.environ.pop("PYTHONPATH", None)
            os.environ.update(env)
            try:
                with tempfile.TemporaryDirectory() as folder, \
                        ServerProcess(f"sqlite:///{Path(folder) / 'bench.db'}") as server:
                    post_all(server.port, "warmup", bodies[:WARMUP_BATCHES])
                    before = cpu_seconds(server.process.pid)
                    elapsed = post_all(server.port, "run", bodies)
                    used = cpu_seconds(server.process.pid) - before
            finally:
                os.environ.pop("PYTHONPATH", None)
                if saved is not None:
                    os.environ["PYTHONPATH"] = saved
            rates[name].append(steps / elapsed)
            cpu[name].append(used / len(bodies) * 1000)
            print(f"  run {attempt + 1}/{repeat} {name}: {steps / elapsed:,.0f} steps/s, "
                  f"server CPU {cpu[name][-1]:.2f} ms per batch", flush=True)
    medians = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    cpu_medians = {name: sorted(values)[len(values) // 2] for name, values in cpu.items()}
    print(f"HTTP ingest, {steps:,} steps in batches of {batch:,}, median of {repeat}, alternating:")
    print(f"  against {path}: {medians['against']:,.0f} steps/s, {cpu_medians['against']:.2f} ms CPU per batch")
    print(f"  {candidate or 'working tree'}: {medians['candidate']:,.0f} steps/s "
          f"({medians['candidate'] / medians['against']:.2f}x), {cpu_medians['candidate']:.2f} ms CPU per batch "
          f"({cpu_medians['against'] / cpu_medians['candidate']:.2f}x less)")
    return {"steps_per_s": medians, "cpu_ms_per_batch": cpu_medians}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--against-path")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--path", help="the candidate: a folder like --against-path (default: the working tree)")
    options = parser.parse_args()
    if options.http:
        if not options.against_path:
            parser.error("--http needs --against-path")
        http_against(options.against_path, options.steps, options.batch, options.repeat, options.path)
    else:
        storage_side(options.steps, options.batch, options.profile, options.top)
