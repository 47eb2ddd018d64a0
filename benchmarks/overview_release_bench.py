"""The 1M-step overview over HTTP, read cold and again, against the release 3c20f55.

    python benchmarks/overview_release_bench.py [--steps N] [--batch B] [--points P] [--reads R]
                                                [--rounds K] [--against COMMIT]

Each round starts a fresh server of each tree (the release first in odd rounds, the working
tree first in even ones), stores an N-step run in it (B-step JSON batches, 2,000 by default, as
`benchmarks/ingest_bench.py` builds them), restarts it (nothing of the run in memory), then
`GET /api/runs/{run}/series?points=P` R times: read 1 is cold, the median of reads 2..R the warm
figure (the dashboard's zoom-out and refetch). Times are client-side, over HTTP on one
keep-alive connection: the same measure for both trees, whatever their storage.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ingest_bench import Tree, commit_tree, make_batches, median, post_all, tree_env  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402


def read_times(port: int, run: str, points: int, reads: int) -> list[float]:
    """Milliseconds of each of `reads` overview requests, one after another."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        connection.request("GET", f"/api/runs/{run}/series?points={points}")
        answer = connection.getresponse()
        answer.read()
        times.append((time.perf_counter() - started) * 1000)
        if answer.status != 200:
            raise RuntimeError(f"series answered {answer.status}")
    connection.close()
    return times


def measure(tree: Tree, bodies: list[bytes], points: int, reads: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder, tree_env(tree):
        server = ServerProcess(f"sqlite:///{Path(folder) / 'overview.db'}", cli_module=tree.cli_module).start()
        try:
            post_all(server.port, "big", bodies)
            server.restart()  # cold: a fresh process on the stored run
            return read_times(server.port, "big", points, reads)
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2000, help="steps per posted batch (smaller: more segments per chunk)")
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", default="3c20f55", metavar="COMMIT")
    options = parser.parse_args()
    bodies = make_batches(options.steps, options.batch)
    results: dict[str, list[list[float]]] = {}
    with contextlib.ExitStack() as stack:
        trees = [stack.enter_context(commit_tree(options.against)), Tree("working tree")]
        for round_index in range(options.rounds):
            for tree in (trees if round_index % 2 == 0 else trees[::-1]):
                times = measure(tree, bodies, options.points, options.reads)
                results.setdefault(tree.name, []).append(times)
                print(f"  round {round_index + 1} {tree.name}: cold {times[0]:.1f} ms, "
                      f"again {median(times[1:]):.1f} ms", flush=True)
    print(f"overview of {options.steps:,} steps at {options.points} points over HTTP, "
          f"{options.rounds} rounds alternated (median over rounds):")
    warm = {}
    for name, rounds in results.items():
        cold = median([times[0] for times in rounds])
        warm[name] = median([median(times[1:]) for times in rounds])
        print(f"  {name:14} cold {cold:8.1f} ms   reads 2..{options.reads} {warm[name]:7.1f} ms")
    base, ours = warm[trees[0].name], warm["working tree"]
    print(f"  reads again: working tree {ours / base:.2f}x the time of {trees[0].name}")


if __name__ == "__main__":
    main()
