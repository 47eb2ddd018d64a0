"""Every step stored exactly once through server crashes.

    python benchmarks/restart_bench.py [--runs 10] [--steps 30000]

Per run: a fresh `gradwatch serve` (temporary SQLite) on a free port; the
agent streams `--steps` steps (one float32 gradient value per tensor, two
tensors, so each step's exact norm is known here); at 20%, 45% and 70% of
the stream the server is SIGKILLed and started again 0.5 s later on the same
port and database; right after the last step, `flush()` and `close()`. Then
the server's series is read back and compared with the reference: every step
present once, with its own pre-clip norm bit for bit (as float32) and loss.
Prints, per run, the flush result and how long flush+close took, and at the
end how many of N runs were complete (goal: N of N).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.agent import GradWatch  # noqa: E402
from gradwatch.clip import GlobalNorm  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402


def value_of(step: int) -> np.float32:
    return np.float32(1.0 + (step * 7919 % 10007) / 1024.0)


def expected_norm(step: int) -> np.float32:
    v = value_of(step)
    return np.float32(np.sqrt(np.float32(v * v) + np.float32(v * v)))


def one_run(steps: int, folder: Path, run: str) -> dict:
    server = ServerProcess(f"sqlite:///{folder / 'bench.db'}", log_path=folder / "server.log").start()
    kills = {int(steps * share) for share in (0.20, 0.45, 0.70)}
    restarters: list[threading.Thread] = []
    watch = GradWatch(run, url=server.url, clipper=GlobalNorm(1.0), spool_dir=folder / "spool", detectors=[])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "cannot reach the server": expected here
            for step in range(steps):
                v = float(value_of(step))
                mx.eval(watch.step({"a": mx.array([v]), "b": mx.array([v])}, loss=step / 4))
                if step in kills:
                    for restarter in restarters:
                        restarter.join()
                    server.kill()
                    restarters.append(threading.Timer(0.5, server.start))
                    restarters[-1].start()
            started = time.monotonic()
            result = watch.flush(timeout=120)
            final = watch.close()
            closing_s = time.monotonic() - started
        for restarter in restarters:
            restarter.join()
        with urllib.request.urlopen(f"{server.url}/api/runs/{run}/series?points={steps * 2}"
                                    f"&fields=pre_norm,loss", timeout=60) as answer:
            series = json.loads(answer.read())
    finally:
        server.stop()
    stored = series["step"]
    complete = (stored == list(range(steps))
                and [np.float32(value) for value in series["pre_norm"]] == [expected_norm(s) for s in range(steps)]
                and series["loss"] == [step / 4 for step in range(steps)])
    return {"complete": complete, "stored": len(stored), "distinct": len(set(stored)),
            "flush": result, "close": final, "flush_close_s": closing_s,
            "dropped": watch.stats.dropped_total}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30_000)
    args = parser.parse_args(argv)
    complete = 0
    for index in range(args.runs):
        folder = Path(tempfile.mkdtemp(prefix="gradwatch-restart-bench-"))
        try:
            figures = one_run(args.steps, folder, f"restart-{index}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        complete += figures["complete"]
        flush = figures["flush"]
        print(f"run {index + 1}: {'complete' if figures['complete'] else 'INCOMPLETE'}; "
              f"{figures['stored']:,} rows, {figures['distinct']:,} distinct of {args.steps:,}; flush -> "
              f"{bool(flush)} (acked {flush.acked:,}, spooled {flush.spooled:,}, pending {flush.pending:,}, "
              f"unreachable {flush.unreachable}); flush+close {figures['flush_close_s']:.1f} s; "
              f"dropped {figures['dropped']}", flush=True)
    print(f"restart bench: {complete}/{args.runs} runs stored every one of {args.steps:,} steps exactly once "
          f"through 3 server SIGKILLs (restart 0.5 s later each)")
    return {"runs": args.runs, "complete": complete}


if __name__ == "__main__":
    main()
