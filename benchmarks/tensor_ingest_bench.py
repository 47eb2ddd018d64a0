"""Ingest with per-tensor norms, in the small batches an agent sends, against the same steps without.

    python benchmarks/tensor_ingest_bench.py [--tensors 300] [--steps 8192] [--batch 100] [--repeat 3]

Stores `--steps` steps in `--batch`-step batches through `Store.ingest` (the
server's ingest without HTTP) into a fresh SQLite file, once with
`--tensors` per-tensor norms per step (an LLM's layout: 30 blocks of 10
tensors) and once without, interleaved `--repeat` times; prints the median
milliseconds per batch of each, their ratio, and the database bytes per
tensor norm. Tensor rows go in as chunk segments (server/storage/ingest.py),
so a batch costs what it adds, not the size of the chunk it lands in.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.server.wire import parse_batch  # noqa: E402
from gradwatch.server.storage import Store, create_schema, make_engine  # noqa: E402


def make(steps: int, batch: int, tensors: int, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i // 10}.m{i % 10}.weight" for i in range(tensors)]
    plain, with_tensors = [], []
    for begin in range(0, steps, batch):
        block = np.arange(begin, min(begin + batch, steps))
        body = {"step": block.tolist(), "pre_norm": np.exp(rng.normal(size=len(block))).tolist()}
        plain.append(parse_batch(dict(body)))
        norms = rng.random((len(block), tensors)).astype(np.float32)
        with_tensors.append(parse_batch({**body, "tensor_norms": {"names": names, "norms": norms.tolist()}}))
    return plain, with_tensors


def store_all(batches: list, folder: Path, name: str) -> tuple[float, int]:
    path = folder / f"{name}.db"
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    store = Store(engine)
    started = time.perf_counter()
    for batch in batches:
        store.ingest("t", batch)
    elapsed = time.perf_counter() - started
    store.read("PRAGMA wal_checkpoint(TRUNCATE)")   # the file's size without the write-ahead log
    engine.dispose()
    return elapsed / len(batches) * 1000, path.stat().st_size


def main(tensors: int = 300, steps: int = 8192, batch: int = 100, repeat: int = 3) -> dict:
    plain, with_tensors = make(steps, batch, tensors)
    base, tens, sizes = [], [], []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:   # a checkpoint may still run
        for index in range(repeat):
            base.append(store_all(plain, Path(folder), f"plain{index}")[0])
            ms, size = store_all(with_tensors, Path(folder), f"tensors{index}")
            tens.append(ms)
            sizes.append(size)
    b, t = statistics.median(base), statistics.median(tens)
    per_norm = statistics.median(sizes) / (steps * tensors)
    print(f"ingest, {steps:,} steps in batches of {batch}: {t:.1f} ms per batch with {tensors} tensor norms "
          f"per step, {b:.1f} ms without: ratio {t / b:.2f} (median of {repeat}); "
          f"{per_norm:.1f} database bytes per tensor norm")
    return {"ms_per_batch_tensors": t, "ms_per_batch_plain": b, "ratio": t / b, "bytes_per_norm": per_norm}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--steps", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    main(arguments.tensors, arguments.steps, arguments.batch, arguments.repeat)
