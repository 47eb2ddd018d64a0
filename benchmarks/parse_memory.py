"""Memory of parsing one ingest body: bounded parse (`server/parse.py`) against the whole-document
reference (`orjson.loads` + `schemas.parse_batch`, what ingest did before), measured in the same run.

Part 1, in this process: the peak of Python allocations (tracemalloc) while each body is parsed
(the body itself, allocated before, is not counted), as a ratio to the body's size, for valid
batches and the hostile shapes of issue 11, at 1, 8 and 32 MiB (the reference at 1 and 8 MiB
only: at 32 MiB it takes gigabytes). Part 2, through a real `gradwatch serve` (SQLite): the rise
of the server's peak resident memory (VmHWM in /proc) for the issue's probe, a 32 MiB body of
`{"step":[0],"pre_norm":[{},{},...]}`, sent once and then four at once, and for a valid 32 MiB
agent batch (parsed and stored). Before this parser the probe raised it by ~1 GB (31x).

    python benchmarks/parse_memory.py [--sizes 1 8 32] [--no-server]
"""
from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.server import parse as P  # noqa: E402
from gradwatch.server.schemas import BatchError  # noqa: E402
from gradwatch.server.storage.registry import VALUE_COLUMNS  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402

MiB = 1 << 20


def _fill(prefix: bytes, item: bytes, suffix: bytes, size: int) -> bytes:
    count = max(1, (size - len(prefix) - len(suffix)) // (len(item) + 1))
    return prefix + b",".join([item] * count) + suffix


def agent_batch(size: int) -> bytes:
    """What the agent sends: every column, floats with 17 digits."""
    n = max(1, size // 148)
    rng = np.random.default_rng(0)
    pre = np.exp(rng.normal(0, 0.3, n))
    return orjson.dumps({
        "step": list(range(n)), "pre_norm": pre.tolist(), "post_norm": np.minimum(pre, 1.5).tolist(),
        "scale": np.minimum(1.5 / pre, 1).tolist(), "threshold": [1.5] * n, "clipped": (pre > 1.5).tolist(),
        "loss": (3 - pre / 10).tolist(), "lr": [3e-4] * n, "z": rng.normal(0, 1, n).tolist(),
        "ema": pre.tolist(), "spike": [False] * n, "nonfinite": [False] * n,
        "time": (1.7e9 + np.arange(n) * 0.01).tolist()})


def compact_batch(size: int) -> bytes:
    """The valid body with the most numbers per byte: every column, each value `0`."""
    n = max(1, size // 36)
    return orjson.dumps({"step": list(range(n)), **{name: [0] * n for name in VALUE_COLUMNS}})


def tensor_batch(size: int) -> bytes:
    """Per-tensor norms: 100 tensors a step, 6 decimals."""
    n = max(1, size // 1000)
    norms = np.round(np.random.default_rng(0).random((n, 100)), 6).tolist()
    return orjson.dumps({"step": list(range(n)), "pre_norm": [1.0] * n,
                         "tensor_norms": {"names": [f"layers.{i}.weight" for i in range(100)], "norms": norms}})


SHAPES = {  # name -> (make(size) -> body, a WebSocket message?)
    "valid: agent batch": (agent_batch, False),
    "valid: all zeros": (compact_batch, False),
    "valid: tensor_norms": (tensor_batch, False),
    "list of {}": (lambda s: _fill(b'{"step":[0],"pre_norm":[', b"{}", b"]}", s), False),
    "lists of long lists": (lambda s: _fill(b'{"step":[0],"pre_norm":[', b"[" + b",".join([b"0"] * 4000) + b"]",
                                            b"]}", s), False),
    "short strings": (lambda s: _fill(b'{"step":[0],"pre_norm":[', b'"a"', b"]}", s), False),
    "nested objects": (lambda s: _fill(b'{"step":[0],"pre_norm":[0],"x":[', b'{"a":{"b":[{}]}}', b"]}", s), False),
    "ws: many events": (lambda s: _fill(b'{"type":"batch","seq":1,"run":"r","events":[', b'{"kind":"a"}',
                                        b"]}", s), True),
    "ws: meta of {}": (lambda s: _fill(b'{"type":"batch","seq":1,"run":"r","meta":{"a":[', b"{}", b"]}}", s), True),
}


def reference(body: bytes, message: bool):
    return P._reference_message(body) if message else P._reference_batch(body)


def bounded(body: bytes, message: bool):
    return P.load_message(body) if message else P.load_batch(body)


def peak_of(parse, body: bytes, message: bool) -> tuple[int, float, str]:
    """(peak bytes allocated while parsing, seconds, outcome)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        parse(body, message)
        outcome = "accepted"
    except BatchError as error:
        outcome = f"422 {str(error)[:60]}"
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds, outcome


def in_process(sizes: list[int]) -> None:
    print("peak parse memory / body size (tracemalloc; seconds are under tracemalloc, slower than real)")
    print(f"{'size':>6}  {'shape':22}  {'bounded':>8}  {'reference':>9}  outcome")
    for size in sizes:
        for name, (make, message) in SHAPES.items():
            body = make(size * MiB)
            peak, _, outcome = peak_of(bounded, body, message)
            ref = "-"
            if size <= 8:
                ref_peak, _, _ = peak_of(reference, body, message)
                ref = f"{ref_peak / len(body):8.2f}x"
            print(f"{size:>3} MiB  {name:22}  {peak / len(body):7.2f}x  {ref:>9}  {outcome}")


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def post(port: int, body: bytes, answers: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/api/runs/probe/steps", body=body, headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    answers.append((answer.status, answer.read()[:120]))
    connection.close()


def through_server() -> None:
    probe = _fill(b'{"step":[0],"pre_norm":[', b"{}", b"]}", 32 * MiB - 1024)
    valid = agent_batch(32 * MiB - 1024)
    print("\nthrough a real server (SQLite): the rise of the server process's peak RSS (VmHWM)")
    for label, body, at_once in (("the issue's probe, [{},...]", probe, 1), ("the issue's probe, [{},...]", probe, 4),
                                 ("a valid agent batch, stored", valid, 1)):
        with tempfile.TemporaryDirectory() as folder, \
                ServerProcess(f"sqlite:///{Path(folder) / 'probe.db'}") as server:
            pid = server.process.pid
            warm: list = []
            post(server.port, b'{"step":[0],"pre_norm":[1.0]}', warm)  # first request: imports, pools
            before = vm_hwm(pid)
            answers: list = []
            threads = [threading.Thread(target=post, args=(server.port, body, answers)) for _ in range(at_once)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rise = vm_hwm(pid) - before
            statuses = sorted(status for status, _ in answers)
            print(f"  {label:28} {len(body) / MiB:4.1f} MiB, {at_once} at once: answers {statuses}, "
                  f"peak RSS +{rise / MiB:.0f} MiB ({rise / len(body):.2f}x one body)")


def parse_time() -> None:
    """What bounding costs the usual case: a 2,000-step agent batch, best of 25 passes."""
    from benchmarks.ingest_bench import make_batches

    bodies = make_batches(20_000, 2_000)
    best = {"reference": float("inf"), "bounded": float("inf")}
    for _ in range(25):
        for name, parse in (("reference", P._reference_batch), ("bounded", P.load_batch)):
            started = time.perf_counter()
            for body in bodies:
                parse(body)
            best[name] = min(best[name], (time.perf_counter() - started) / len(bodies))
    print(f"\nparse time of a 2,000-step batch ({len(bodies[0]) / 1024:.0f} KiB): bounded "
          f"{best['bounded'] * 1e3:.2f} ms, reference {best['reference'] * 1e3:.2f} ms "
          f"(ratio {best['bounded'] / best['reference']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    in_process(args.sizes)
    parse_time()
    if not args.no_server:
        through_server()


if __name__ == "__main__":
    main()
