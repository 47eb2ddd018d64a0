"""Where an ingest batch's time goes on the storage side, and main against an older commit over HTTP.

    python benchmarks/ingest_profile.py [--steps N] [--batch B] [--against-path DIR] [--repeat R]
    python benchmarks/ingest_profile.py --profile [--top K]
    python benchmarks/ingest_profile.py --http --against-path DIR [--path DIR2] [--repeat R]

DIR: a folder holding an importable `gradwatch` package of another commit, e.g. for the
release: `git worktree add /tmp/rel 3c20f55; mkdir -p /tmp/relpkg/gradwatch; touch
/tmp/relpkg/gradwatch/__init__.py; for d in clip agent server dashboard; do ln -s /tmp/rel/$d
/tmp/relpkg/gradwatch/$d; done` and `--against-path /tmp/relpkg`.

- default: the storage side alone: the 11-column 2,000-step batches of
  `benchmarks/ingest_bench.py` as validated batches (built here, not by the server's
  decoder, so any commit's store takes them), stored one after another through
  `Store.ingest` into a fresh SQLite file, in a fresh process per run: CPU of the ingesting
  thread per batch (what the store costs, steady on a loaded machine), of the whole process
  (with the WAL checkpointer thread), wall time, and the bytes the process wrote per batch
  (/proc/self/io `wchar`: WAL appends and checkpoint copies); with `--against-path`, that commit
  alternating with the working tree, `--repeat` runs each, medians and ratios.
  `--profile`: the working tree under cProfile, the `--top` functions by cumulative and
  by own time.
- `--http --against-path DIR`: a fresh server of that commit (`PYTHONPATH=DIR`) and of the
  working tree are started in turn, `--repeat` times, alternating, each posting the same
  bodies on one keep-alive connection; prints each one's median steps/s, the server's CPU
  per batch (all its threads, from /proc) and the ratios. `--path DIR2` measures another
  such folder instead of the working tree.
  The machine is shared: take the medians, and alternate (drift hits both alike).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ingest_bench import WARMUP_BATCHES, make_batches, post_all  # noqa: E402


STORAGE_RUN = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from benchmarks.ingest_profile import plain_batches
try:                                   # the storage package (2026-11-30 on)
    from gradwatch.server.storage import Store, create_schema, make_engine
except ImportError:                    # the release 3c20f55: server/db.py and server/storage.py
    from gradwatch.server.db import create_schema, make_engine
    from gradwatch.server.storage import Store
batches = plain_batches(int(sys.argv[2]), int(sys.argv[3]))
with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:  # a late WAL checkpoint may still write
    engine = make_engine(f"sqlite:///{Path(folder) / 'profile.db'}")
    create_schema(engine)
    store = Store(engine)
    for item in batches[:2]:
        store.ingest("warmup", item)
    thread = []
    def written():                    # bytes this process wrote (WAL appends and checkpoints), Linux
        try:
            return int(next(l for l in open("/proc/self/io") if l.startswith("wchar")).split()[1])
        except (OSError, StopIteration):
            return 0
    start_written = written()
    process, wall = time.process_time(), time.perf_counter()
    for item in batches:
        started = time.thread_time()
        store.ingest("run", item)
        thread.append(time.thread_time() - started)
    wall = time.perf_counter() - wall
    time.sleep(0.5)                   # the WAL checkpointer thread (0.3 s apart) finishes its last checkpoint
    process = time.process_time() - process
    wrote = written() - start_written
    engine.dispose()
print(json.dumps({"thread": thread, "process": process, "wall": wall, "written": wrote}))
"""


def plain_batches(steps: int, batch: int) -> list:
    """The benchmark's bodies as validated batches (float64 columns, bools 0/1), built without
    the server's decoder, so that any commit's store takes them."""
    from dataclasses import dataclass

    import numpy as np
    import orjson

    @dataclass
    class Column:
        values: np.ndarray
        missing: np.ndarray | None = None
        raw: list | None = None

    @dataclass
    class Batch:
        steps: np.ndarray
        columns: dict
        tensor_names: list | None = None
        tensor_norms: np.ndarray | None = None

        def __len__(self) -> int:
            return len(self.steps)

    out = []
    for body in make_batches(steps, batch):
        columns = orjson.loads(body)
        step = np.asarray(columns.pop("step"), np.int64)
        out.append(Batch(step, {name: Column(np.asarray(values, np.float64)) for name, values in columns.items()}))
    return out


def storage_side(steps: int, batch: int, profile: bool, top: int, against: str | None, repeat: int) -> dict:
    """The store alone (no HTTP, no decoding): CPU of the ingesting thread per batch (steady on
    a loaded machine: time waiting for a core is not counted) and of the whole process (with
    the WAL checkpointer thread). With `against`, that commit in alternation, fresh processes."""
    if profile:
        return _profile_storage(steps, batch, top)
    configs = ([("against", str(Path(against).resolve()))] if against else []) + [("working tree", None)]
    results: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for _ in range(repeat):
        for name, path in configs:
            env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
            if path:
                env["PYTHONPATH"] = path
            out = subprocess.run([sys.executable, "-c", STORAGE_RUN, str(ROOT), str(steps), str(batch)], env=env,
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"storage side: {steps:,} steps in batches of {batch:,}, {repeat} fresh processes each"
          + (", alternating" if against else "") + " (ms per batch; medians):")
    medians = {}
    for name, runs in results.items():
        n = len(runs[0]["thread"])
        thread = float(np.median([sum(r["thread"]) / n * 1000 for r in runs]))
        process = float(np.median([r["process"] / n * 1000 for r in runs]))
        wall = float(np.median([r["wall"] / n * 1000 for r in runs]))
        written = float(np.median([r.get("written", 0) / n / 1024 for r in runs]))
        medians[name] = {"thread_ms": thread, "process_ms": process, "wall_ms": wall, "written_kb": written}
        line = f"  {against if name == 'against' else name}: ingest thread CPU {thread:.2f}, process CPU {process:.2f}"
        if against and name != "against":
            base = medians["against"]
            line += (f" ({base['thread_ms'] / thread:.2f}x and {base['process_ms'] / process:.2f}x "
                     f"as fast as against)")
        print(line + f", wall {wall:.2f}, written {written:.0f} KB per batch (WAL and checkpoints)")
    return medians


def _profile_storage(steps: int, batch: int, top: int) -> dict:
    from gradwatch.server.storage import Store, create_schema, make_engine

    batches = plain_batches(steps, batch)
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'profile.db'}")
        create_schema(engine)
        store = Store(engine)
        for item in batches[:WARMUP_BATCHES]:
            store.ingest("warmup", item)
        profiler = cProfile.Profile()
        profiler.enable()
        started = time.perf_counter()
        for item in batches:
            store.ingest("run", item)
        total = time.perf_counter() - started
        profiler.disable()
        engine.dispose()
    print(f"storage side under cProfile: {len(batches)} batches x {batch:,} steps: {total:.2f} s")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return {"seconds": total}


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
        storage_side(options.steps, options.batch, options.profile, options.top, options.against_path,
                     options.repeat)
