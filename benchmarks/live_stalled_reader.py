"""Server memory with a `/ws/live` reader that stops reading (issue 19, item 2).

Through a real `gradwatch serve` (SQLite), fresh for each case: one small batch and a
`/ws/live` socket (a raw socket with a small receive buffer that reads the replay and then
nothing), then 20 POSTs of 100,000 steps (step, pre_norm, loss); the server's resident
memory (VmRSS) and peak (VmHWM) from /proc, against the same POSTs with no live reader,
measured in the same run. Before the byte bound the stalled reader took the server from
107 to 503 MB (136 MB without it); the goal is <= +30 MB over the run without a reader.

    python benchmarks/live_stalled_reader.py [--posts 20] [--steps 100000] [--repeat 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import ServerProcess  # noqa: E402
from tests.test_server_live_backlog import RawReader  # noqa: E402

RUN = "stalled"


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def one_case(stalled: bool, posts: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(f"sqlite:///{folder}/live.db").start()
        reader = None
        try:
            pid = server.process.pid
            rng = np.random.default_rng(0)
            with httpx.Client(base_url=server.url, timeout=300) as client:
                client.post(f"/api/runs/{RUN}/steps", json={"step": [0], "pre_norm": [1.0]}).raise_for_status()
                if stalled:
                    reader = RawReader(f"{server.ws_url}/ws/live/{RUN}?since=-1")
                    reader.next_message()   # subscribed (the replay); from here on it reads nothing
                start_rss, _ = memory_mib(pid)
                for index in range(posts):
                    first = 1 + index * steps
                    body = {"step": list(range(first, first + steps)),
                            "pre_norm": np.exp(rng.normal(0, 0.3, steps)).tolist(),
                            "loss": (3 - np.arange(steps) / steps).tolist()}
                    client.post(f"/api/runs/{RUN}/steps", json=body).raise_for_status()
                    del body
                end_rss, peak = memory_mib(pid)
            resync = None
            if reader is not None:     # what the stalled reader finds once it reads again
                kinds = []
                while not kinds or kinds[-1] != "resync":
                    kinds.append(reader.next_message()["type"])
                resync = f"{len(kinds) - 1} updates, then resync"
            return {"start": start_rss, "end": end_rss, "peak": peak, "resync": resync}
        finally:
            if reader is not None:
                reader.close()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeat):          # alternate: the machine's load hits both alike
        for stalled in (False, True):
            rows[stalled].append(one_case(stalled, args.posts, args.steps))
    print(f"{args.posts} POSTs of {args.steps:,} steps; server memory in MiB (median of {args.repeat})")
    print(f"{'case':<22}{'RSS start':>10}{'RSS end':>10}{'peak':>10}  stalled reader saw")
    for stalled, label in ((False, "no live reader"), (True, "one stalled reader")):
        median = {key: statistics.median(r[key] for r in rows[stalled]) for key in ("start", "end", "peak")}
        print(f"{label:<22}{median['start']:>10.0f}{median['end']:>10.0f}{median['peak']:>10.0f}  "
              f"{rows[stalled][-1]['resync'] or '-'}")
    extra_end = statistics.median(r["end"] for r in rows[True]) - statistics.median(r["end"] for r in rows[False])
    extra_peak = statistics.median(r["peak"] for r in rows[True]) - statistics.median(r["peak"] for r in rows[False])
    print(f"stalled reader costs: RSS at end {extra_end:+.0f} MiB, peak {extra_peak:+.0f} MiB (goal <= +30 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
