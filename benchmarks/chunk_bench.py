"""Chunk codec and summary figures, each against a raw NumPy baseline measured in the same run.

    python benchmarks/chunk_bench.py [--steps 1000000] [--repeat 5]

- encode/decode: steps/s of encode_chunk/decode_chunk over a run of the server's
  12 value columns, against `tobytes`/`frombuffer` of the same float64 arrays
  (the cheapest thing a store could do) -> ratio.
- bytes per step: float32-exact columns vs float64 columns, and zlib level 1.
- overview of the whole run at 2,000 points: from summaries (decoding only the
  chunks that hold non-finite or flagged steps) vs decoding every chunk and
  running today's `stats.downsample_indices` -> ratio. Also the summary
  bytes read versus the raw column bytes.
Times are medians of --repeat runs (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.server.storage.chunks import (CHUNK, MemorySource, bucket_grid, decode_chunk, encode_chunk,
                                             overview, series_from_arrays)
from gradwatch.server.analysis.stats import downsample_indices  # noqa: E402

SPEC = {"pre_norm": "float", "post_norm": "float", "scale": "float", "threshold": "float", "clipped": "bool",
        "loss": "float", "lr": "float", "z": "float", "ema": "float", "spike": "bool", "nonfinite": "bool",
        "time": "float"}


def make(n: int, float32_exact: bool):
    rng = np.random.default_rng(0)
    pre = np.exp(rng.normal(0.0, 0.3, n))
    pre[rng.choice(n, max(n // 100_000, 1), replace=False)] *= 20.0
    pre[rng.choice(n, 3, replace=False)] = np.nan
    if float32_exact:   # what an MLX agent sends: float32 norms
        pre = pre.astype(np.float32).astype(np.float64)
    threshold = np.full(n, 1.5)
    post = np.minimum(pre, threshold)
    cols = {"pre_norm": pre, "post_norm": post, "scale": post / pre, "threshold": threshold,
            "clipped": (pre > threshold).astype(float), "loss": 3.0 - np.log1p(np.arange(n)) / 10,
            "lr": np.full(n, 3e-4), "z": rng.normal(size=n), "ema": pre * 0.9,
            "spike": (pre > 10).astype(float), "nonfinite": (~np.isfinite(pre)).astype(float),
            "time": 1.7e9 + np.arange(n) * 0.05}
    if float32_exact:
        for name in ("post_norm", "scale", "loss", "lr", "z", "ema"):
            cols[name] = cols[name].astype(np.float32).astype(np.float64)
    return np.arange(n), cols


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = args.steps
    for exact in (True, False):
        steps, cols = make(n, exact)
        chunks = series_from_arrays(steps, SPEC, cols)
        encoded: list[dict] = []
        enc = timed(lambda: encoded.__setitem__(slice(None), [encode_chunk(c, SPEC) for c in chunks]), args.repeat)
        dec = timed(lambda: [decode_chunk(c.chunk_id, b, SPEC) for c, b in zip(chunks, encoded)], args.repeat)
        raw_arrays = [np.ascontiguousarray(cols[k]) for k in SPEC]
        raw_blobs: list = []
        raw_enc = timed(lambda: raw_blobs.__setitem__(slice(None), [a.tobytes() for a in raw_arrays]), args.repeat)
        raw_dec = timed(lambda: [np.frombuffer(b, np.float64).copy() for b in raw_blobs], args.repeat)
        size = sum(len(b) for blobs in encoded for b in blobs.values())
        zsize = sum(len(zlib.compress(b, 1)) for blobs in encoded for b in blobs.values())
        zdec = timed(lambda: [encode_chunk(c, SPEC, level=1) for c in chunks[:20]], 1) / 20 * len(chunks)
        label = "float32-exact values" if exact else "float64 values"
        print(f"[{label}] {n:,} steps x {len(SPEC)} columns, {len(chunks)} chunks")
        print(f"  encode {n / enc / 1e6:7.2f} M steps/s   raw tobytes {n / raw_enc / 1e6:7.2f} M steps/s  "
              f"ratio {raw_enc / enc:5.2f}")
        print(f"  decode {n / dec / 1e6:7.2f} M steps/s   raw frombuffer {n / raw_dec / 1e6:7.2f} M steps/s  "
              f"ratio {raw_dec / dec:5.2f}")
        print(f"  bytes/step {size / n:6.2f}  (raw float64 rows: {8 * len(SPEC) + 8}; ratio "
              f"{size / n / (8 * len(SPEC) + 8):4.2f});  zlib-1 {zsize / n:6.2f} B/step "
              f"({zsize / size:4.2f}x), encode with zlib-1 {zdec:5.2f} s for the run")

    steps, cols = make(n, True)
    source = MemorySource(SPEC)
    put = timed(lambda: [source.put(c) for c in series_from_arrays(steps, SPEC, cols)], 1)
    level_bytes = {w: sum(len(b) for b in table.values()) for w, table in source.levels.items()}
    used = bucket_grid(0, n - 1, 2000).level
    summary_bytes = level_bytes[used]
    fields = ("pre_norm", "post_norm", "threshold", "clipped", "loss", "spike", "nonfinite")

    def from_summaries():
        source.decoded.clear()
        return overview(source, SPEC, 0, n - 1, 2000, fields)

    def from_raw():
        parts = [decode_chunk(c, source.blobs[c], SPEC, fields) for c in sorted(source.blobs)]
        pre = np.concatenate([p.values["pre_norm"] for p in parts])
        keep = np.concatenate([p.values["spike"] | p.values["nonfinite"] for p in parts])
        chosen = downsample_indices(pre, 2000, keep)
        return {f: np.concatenate([p.values[f] for p in parts])[chosen] for f in fields}

    t_sum = timed(from_summaries, args.repeat)
    t_raw = timed(from_raw, args.repeat)
    series = from_summaries()
    raw_bytes = sum(len(source.blobs[c][f]) for c in source.blobs for f in fields + ("step",))
    print(f"[overview of {n:,} steps at 2,000 points, {len(fields)} fields]")
    print(f"  ingest-side chunk+summarize+encode: {put:5.2f} s for the run; summary bytes/step by level: "
          + ", ".join(f"{w}: {b / n:5.2f}" for w, b in level_bytes.items()) + f"; the overview reads level {used}")
    print(f"  from summaries {t_sum * 1e3:7.1f} ms ({len(series.steps)} rows, chunks decoded: "
          f"{len(set(series.decoded))} of {len(source.blobs)}; summary bytes read {summary_bytes / 1e6:5.2f} MB)")
    print(f"  from raw (decode all + downsample_indices) {t_raw * 1e3:7.1f} ms (raw bytes {raw_bytes / 1e6:5.2f} MB)"
          f"  ratio raw/summaries {t_raw / t_sum:5.2f}")
    assert len(series.steps) > 0 and CHUNK > 0


if __name__ == "__main__":
    main()
