"""Memory of parsing one ingest body: the binary encoding (msgpack, typed columns read in place)
against its bound (1.5x the body), and JSON (orjson) against the 36x it is charged.

Part 1, in this process: the peak of Python allocations (tracemalloc) while each body is decoded
and validated by `server/wire` (the body itself, allocated before, is not counted), as a ratio to
the body's size: valid binary batches and hostile binary shapes at 1, 8 and 32 MiB, and the same
columns as JSON at 1 and 8 MiB (JSON bodies are limited to 8 MiB). Part 2, through a real
`gradwatch serve` (SQLite): the rise of the server's peak resident memory (VmHWM in /proc) for a
hostile 32 MiB binary body (a column of empty maps), once and four at once, a valid 32 MiB binary
agent batch (decoded and stored), and an 8 MiB JSON body of `{}` (the worst JSON shape).

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

import msgpack
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.server.wire import BatchError, json_decode, msgpack_decode  # noqa: E402
from tests.procs import ServerProcess  # noqa: E402

MiB = 1 << 20
FLOATS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "z", "ema")
BOOLS = ("clipped", "spike", "nonfinite", "skipped", "level_shift")


def typed(values: np.ndarray) -> msgpack.ExtType:
    array = np.ascontiguousarray(values)
    return msgpack.ExtType(1, array.dtype.str.encode().ljust(8, b"\0") + array.tobytes())


def agent_columns(size: int) -> dict:
    n = size // 70
    pre = np.exp(np.random.default_rng(1).normal(0, 0.3, n)).astype(np.float32)
    columns = {"step": np.arange(n, dtype=np.int64), "time": 1.7e9 + np.arange(n) * 0.01, "lr": np.full(n, 3e-4)}
    columns.update({name: pre for name in FLOATS})
    columns.update({name: pre > 1.2 for name in BOOLS})
    return columns


def agent_binary(size: int) -> bytes:
    return msgpack.packb({name: typed(values) for name, values in agent_columns(size).items()})


def agent_json(size: int) -> bytes:
    return orjson.dumps({name: values for name, values in agent_columns(size // 3).items()},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def tensors_binary(size: int) -> bytes:
    n = size // 1208
    return msgpack.packb({"step": typed(np.arange(n, dtype=np.int64)), "pre_norm": typed(np.ones(n, np.float32)),
                          "tensor_norms": {"names": [f"layers.{i}.weight" for i in range(300)],
                                           "norms": typed(np.random.default_rng(2).random((n, 300)).astype(np.float32))}})


def flags_binary(size: int) -> bytes:
    n = size // 13
    return msgpack.packb({"step": typed(np.arange(n, dtype=np.int64)), "pre_norm": typed(np.ones(n, np.float32)),
                          **{name: typed(np.zeros(n, bool)) for name in BOOLS}})


def unsorted_binary(size: int) -> bytes:
    n = size // 12
    steps = np.arange(n, dtype=np.int64)[::-1].copy()
    steps[-1] = steps[0]
    return msgpack.packb({"step": typed(steps), "pre_norm": typed(np.ones(n, np.float32))})


def maps_binary(size: int) -> bytes:
    return msgpack.packb({"step": [0], "pre_norm": [{}] * size})


def names_binary(size: int) -> bytes:
    return msgpack.packb({"step": [0], "pre_norm": [1.0], "tensor_norms": {
        "names": [str(i % 100).zfill(2) for i in range(size // 3)], "norms": [[0]]}})


def maps_json(size: int) -> bytes:
    return b'{"step":[0],"pre_norm":[' + b",".join([b"{}"] * (size // 3)) + b"]}"


BINARY = {"agent batch (11 columns)": agent_binary, "300 tensor norms": tensors_binary,
          "1-byte flags": flags_binary, "unsorted repeating steps": unsorted_binary,
          "a column of {} (hostile)": maps_binary, "names of 2 bytes (hostile)": names_binary}
JSON = {"agent batch (11 columns)": agent_json, "a column of {} (hostile)": maps_json}


def peak_of(load, body: bytes) -> tuple[int, float, str]:
    """(peak bytes allocated while decoding, seconds, outcome)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        load(body)
        outcome = "accepted"
    except BatchError as error:
        outcome = f"{error.status} {str(error)[:60]}"
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds, outcome


def in_process(sizes: list[int]) -> None:
    print("peak decode memory / body size (tracemalloc); bounds: binary 1.5x, JSON charged "
          f"{json_decode.PARSE_FACTOR}x")
    print(f"{'size':>7}  {'encoding':8}  {'shape':28}  {'peak':>7}  outcome")
    for size in sizes:
        for name, make in BINARY.items():
            body = make(size * MiB)
            peak, _, outcome = peak_of(msgpack_decode.load_batch, body)
            print(f"{size:>3} MiB  {'msgpack':8}  {name:28}  {peak / len(body):6.2f}x  {outcome}")
        if size * MiB <= json_decode.MAX_JSON_BODY:
            for name, make in JSON.items():
                body = make(size * MiB)
                peak, _, outcome = peak_of(json_decode.load_batch, body)
                print(f"{size:>3} MiB  {'json':8}  {name:28}  {peak / len(body):6.2f}x  {outcome}")


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def post(port: int, body: bytes, media_type: str, answers: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/api/runs/probe/steps", body=body, headers={"Content-Type": media_type})
    answer = connection.getresponse()
    answers.append((answer.status, answer.read()[:120]))
    connection.close()


def through_server() -> None:
    size = 32 * MiB - 1024
    cases = (("hostile binary, a column of {}", maps_binary(size), msgpack_decode.MEDIA_TYPE, 1),
             ("hostile binary, a column of {}", maps_binary(size), msgpack_decode.MEDIA_TYPE, 4),
             ("a valid binary agent batch, stored", agent_binary(size), msgpack_decode.MEDIA_TYPE, 1),
             ("hostile JSON, [{},...] (8 MiB)", maps_json(json_decode.MAX_JSON_BODY - 1024), json_decode.MEDIA_TYPE, 1))
    print("\nthrough a real server (SQLite): the rise of the server process's peak RSS (VmHWM)")
    for label, body, media_type, at_once in cases:
        with tempfile.TemporaryDirectory() as folder, \
                ServerProcess(f"sqlite:///{Path(folder) / 'probe.db'}") as server:
            pid = server.process.pid
            warm: list = []
            post(server.port, b'{"step":[0],"pre_norm":[1.0]}', json_decode.MEDIA_TYPE, warm)  # imports, pools
            before = vm_hwm(pid)
            answers: list = []
            threads = [threading.Thread(target=post, args=(server.port, body, media_type, answers))
                       for _ in range(at_once)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rise = vm_hwm(pid) - before
            statuses = sorted(status for status, _ in answers)
            print(f"  {label:36} {len(body) / MiB:4.1f} MiB, {at_once} at once: answers {statuses}, "
                  f"peak RSS +{rise / MiB:.0f} MiB ({rise / len(body):.2f}x one body)")


def decode_time() -> None:
    """The usual case: a 2,000-step agent batch in each encoding, best of 25 passes."""
    from benchmarks.ingest_bench import make_batches

    bodies = {"json": make_batches(20_000, 2_000), "msgpack": make_batches(20_000, 2_000, encoding="msgpack")}
    loads = {"json": json_decode.load_batch, "msgpack": msgpack_decode.load_batch}
    best = {name: float("inf") for name in bodies}
    for _ in range(25):
        for name, items in bodies.items():
            started = time.perf_counter()
            for body in items:
                loads[name](body)
            best[name] = min(best[name], (time.perf_counter() - started) / len(items))
    print(f"\ndecode + validate a 2,000-step batch: msgpack {best['msgpack'] * 1e3:.3f} ms "
          f"({len(bodies['msgpack'][0]) / 1024:.0f} KiB), JSON {best['json'] * 1e3:.3f} ms "
          f"({len(bodies['json'][0]) / 1024:.0f} KiB): {best['json'] / best['msgpack']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    in_process(args.sizes)
    decode_time()
    if not args.no_server:
        through_server()


if __name__ == "__main__":
    main()
