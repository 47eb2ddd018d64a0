"""The upgrade of a row-per-step database (schema 4) into chunks (Alembic revision 0005).

    python benchmarks/migrate_bench.py [--runs 2] [--steps 500000] [--tensor-steps 100000] [--tensors 16]

Builds a SQLite database at revision 0004 (Alembic) and fills its `steps`,
`tensor_layouts` and `tensor_norms` tables directly, as the release before
chunks stored them (NaN as NULL plus a `nan_mask` bit, a float32 blob of
norms per step), then times `upgrade_database` (what `gradwatch serve` runs
on start) in a child process, and reports steps per second, the child's
peak RSS, and whether every pre-clip norm and tensor norm reads back equal
to what was written. The baseline in the same run is the time to write the
old rows (what the upgrade reads back), for scale.
"""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OLD = ("pre_norm", "post_norm", "scale", "threshold", "clipped", "loss", "lr", "z", "ema", "spike",
       "nonfinite", "time", "skipped", "robust_z", "level_shift")
FLOATS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "lr", "z", "ema", "time", "robust_z")


def build(path: Path, runs: int, steps: int, tensor_steps: int, tensors: int) -> tuple[float, dict]:
    """A schema-4 database; returns the seconds its rows took to write and what was written."""
    from alembic import command

    from gradwatch.server.storage.engine import make_engine
    from gradwatch.server.storage.migrate import alembic_config

    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
    engine.dispose()
    rng = np.random.default_rng(0)
    written: dict = {}
    started = time.perf_counter()
    with sqlite3.connect(path) as db:
        names = [f"layers.{i // 4}.w{i % 4}" for i in range(tensors)]
        for run in range(runs + 1):
            count = steps if run < runs else tensor_steps
            db.execute("INSERT INTO runs (id, name, created, updated, meta, steps, first_step, last_step, clips, "
                       "clip_flags, spikes, nonfinite, version) VALUES (?, ?, 0, 0, '{}', ?, 0, ?, 0, 0, 0, 0, 1)",
                       (run + 1, f"run-{run}", count, count - 1))
            pre = np.exp(rng.normal(size=count)).astype(np.float32).astype(float)
            pre[rng.choice(count, 3, replace=False)] = math.nan
            written[f"run-{run}"] = pre
            rows = []
            for step, value in enumerate(pre.tolist()):
                nan = value != value
                rows.append((run + 1, step, None if nan else value, value if not nan else None, 1.0, 1.5,
                             int(value > 1.5), 2.0, 3e-4, 0.0, 1.0, 0, int(nan), 1.8e9 + step, 0, 0.5, 0,
                             1 if nan else 0))
            db.executemany(f"INSERT INTO steps (run_id, step, {', '.join(OLD)}, nan_mask) VALUES "
                           f"({', '.join('?' * (len(OLD) + 3))})", rows)
            if run == runs:
                db.execute("INSERT INTO tensor_layouts (id, run_id, digest, names) VALUES (1, ?, 'x', ?)",
                           (run + 1, json.dumps(names)))
                norms = rng.random((count, tensors)).astype("<f4")
                written["tensors"] = norms
                db.executemany("INSERT INTO tensor_norms (run_id, step, layout_id, norms) VALUES (?, ?, 1, ?)",
                               [(run + 1, step, norms[step].tobytes()) for step in range(count)])
    return time.perf_counter() - started, written


CHILD = """
import json, resource, sys, time
from gradwatch.server.storage import upgrade_database
started = time.perf_counter()
upgrade_database(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(runs: int = 2, steps: int = 500_000, tensor_steps: int = 100_000, tensors: int = 16) -> dict:
    from gradwatch.server.storage import Store, make_engine

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "old.db"
        write_s, written = build(path, runs, steps, tensor_steps, tensors)
        child = subprocess.run([sys.executable, "-c", CHILD, f"sqlite:///{path}"], capture_output=True,
                               text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        progress = [line for line in child.stderr.splitlines() if "moving steps into chunks" in line]
        store = Store(make_engine(f"sqlite:///{path}"))
        same = True
        for run in range(runs + 1):
            arrays = store.arrays(f"run-{run}", ("pre_norm",))
            same &= bool(np.array_equal(arrays.values["pre_norm"], written[f"run-{run}"], equal_nan=True))
        _, _, norms, _ = store.reader.tensor_steps(store.run_id(f"run-{runs}"), None, None)
        same &= bool(np.array_equal(norms, written["tensors"]))
        store.engine.dispose()
    total = runs * steps + tensor_steps
    print(f"upgrade of {total:,} steps ({runs} x {steps:,}, and {tensor_steps:,} with {tensors} tensor norms) into "
          f"chunks: {result['seconds']:.1f} s, {total / result['seconds']:,.0f} steps/s, child peak RSS "
          f"{result['peak_mb']:.0f} MB; writing those old rows took {write_s:.1f} s (ratio "
          f"{result['seconds'] / write_s:.2f}); {len(progress)} progress lines; values read back equal: {same}")
    return {"seconds": result["seconds"], "steps_per_s": total / result["seconds"], "peak_mb": result["peak_mb"],
            "equal": same}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=500_000)
    parser.add_argument("--tensor-steps", type=int, default=100_000)
    parser.add_argument("--tensors", type=int, default=16)
    arguments = parser.parse_args()
    main(arguments.runs, arguments.steps, arguments.tensor_steps, arguments.tensors)
