"""GlobalNorm against mlx.optimizers.clip_grad_norm on a 25M-parameter tree.

    python benchmarks/clip_bench.py

Both run in this process on the same gradients, interleaved (one of each per
round, the order alternating), many rounds; the figure is the median time.
GlobalNorm is timed with its per-tensor norms evaluated too (what the
gradwatch agent records), so the ratio says what monitoring costs on top of
MLX's own clipping. A NumPy streaming read of the same bytes (``np.sum`` over
each array) is the memory-bandwidth reference.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable like `-m`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from gradwatch.clip import GlobalNorm

LAYERS = 12
HIDDEN = 1024
ROUNDS = 50
WARMUP_ROUNDS = 3


def make_grads(seed: int = 0) -> dict:
    """A transformer-shaped tree: 12 layers × 4 matrices 1024×512 + 1 vector, 25.2M float32."""
    key = mx.random.key(seed)
    layers = []
    for i in range(LAYERS):
        keys = mx.random.split(mx.random.fold_in(key, i), 5) if hasattr(mx.random, "fold_in") \
            else mx.random.split(mx.random.key(seed * 1000 + i), 5)
        layers.append({
            "attn": {"q": mx.random.normal((HIDDEN, HIDDEN // 2), key=keys[0]),
                     "k": mx.random.normal((HIDDEN, HIDDEN // 2), key=keys[1])},
            "mlp": [mx.random.normal((HIDDEN, HIDDEN // 2), key=keys[2]),
                    mx.random.normal((HIDDEN // 2, HIDDEN), key=keys[3])],
            "norm": mx.random.normal((HIDDEN,), key=keys[4]),
        })
    grads = {"layers": layers}
    mx.eval(grads)
    return grads


def time_once(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(rounds: int = ROUNDS) -> dict:
    grads = make_grads()
    leaves = [g for layer in grads["layers"] for g in
              (layer["attn"]["q"], layer["attn"]["k"], *layer["mlp"], layer["norm"])]
    params = sum(g.size for g in leaves)
    nbytes = sum(g.nbytes for g in leaves)
    arrays = [np.array(g) for g in leaves]
    clipper = GlobalNorm(1.0)

    def run_mlx():
        clipped, norm = optim.clip_grad_norm(grads, 1.0)
        mx.eval(clipped, norm)

    def run_gradwatch():
        clipped, info = clipper(grads)
        mx.eval(clipped, info)  # info includes the per-tensor norms

    def run_numpy():
        total = 0.0
        for a in arrays:
            total += float(np.sum(a))
        return total

    # Same numbers first: the benchmark compares like with like.
    want, want_norm = optim.clip_grad_norm(grads, 1.0)
    got, got_info = clipper(grads)
    assert got_info.pre_norm.item() == want_norm.item()
    assert mx.array_equal(got["layers"][3]["mlp"][1], want["layers"][3]["mlp"][1]).item()
    del want, got

    for _ in range(WARMUP_ROUNDS):
        run_mlx(), run_gradwatch(), run_numpy()
    times = {"mlx": [], "gradwatch": [], "numpy": []}
    for i in range(rounds):
        order = [("mlx", run_mlx), ("gradwatch", run_gradwatch)]
        if i % 2:
            order.reverse()
        for name, fn in order + [("numpy", run_numpy)]:
            times[name].append(time_once(fn))

    median = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "params": params,
        "tensors": len(leaves),
        "mb": nbytes / 1e6,
        "rounds": rounds,
        "mlx_clip_grad_norm_ms": median["mlx"] * 1e3,
        "gradwatch_global_norm_ms": median["gradwatch"] * 1e3,
        "ratio": median["gradwatch"] / median["mlx"],
        # Less sensitive to other processes on a shared machine: the median of
        # the per-round ratios, and the ratio of the fastest runs.
        "ratio_paired_median": statistics.median(
            a / b for a, b in zip(times["gradwatch"], times["mlx"])),
        "ratio_min": min(times["gradwatch"]) / min(times["mlx"]),
        "numpy_read_ms": median["numpy"] * 1e3,
        "numpy_read_gb_s": nbytes / median["numpy"] / 1e9,
        # Clipping must read the gradients twice (norm, then scale) and write them once.
        "gradwatch_gb_s_3_passes": 3 * nbytes / median["gradwatch"] / 1e9,
        "mlx_gb_s_3_passes": 3 * nbytes / median["mlx"] / 1e9,
        "device": str(mx.default_device()),
    }
    print(f"clip_bench: {params / 1e6:.1f}M float32 params in {len(leaves)} tensors "
          f"({nbytes / 1e6:.0f} MB), {rounds} interleaved rounds, median, {figures['device']}")
    print(f"  mlx.optimizers.clip_grad_norm      {figures['mlx_clip_grad_norm_ms']:8.2f} ms")
    print(f"  GlobalNorm(1.0) + per-tensor norms {figures['gradwatch_global_norm_ms']:8.2f} ms")
    print(f"  ratio gradwatch / mlx              {figures['ratio']:8.3f}   (goal <= 1.05; "
          f"per-round median {figures['ratio_paired_median']:.3f}, "
          f"fastest runs {figures['ratio_min']:.3f})")
    print(f"  numpy streaming read (np.sum)      {figures['numpy_read_ms']:8.2f} ms  "
          f"= {figures['numpy_read_gb_s']:.1f} GB/s")
    print(f"  GlobalNorm traffic (2 reads + 1 write) {figures['gradwatch_gb_s_3_passes']:.1f} GB/s, "
          f"MLX {figures['mlx_gb_s_3_passes']:.1f} GB/s")
    return figures


if __name__ == "__main__":
    main()
