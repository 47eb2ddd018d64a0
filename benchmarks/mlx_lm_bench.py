"""mlx-lm's own `train()` watched by gradwatch against the same `train()` clipping with MLX.

    python benchmarks/mlx_lm_bench.py [--iters 60] [--rounds 3]

Both runs use `mlx_lm.tuner.trainer.train` (compiled step) on the same tiny random-weight
llama (built from a config, no download) and the same data:
- baseline: `optimizer.update` wrapped to clip with `mlx.optimizers.clip_grad_norm(grads, 1.0)`;
- watched: `gradwatch.agent.integrations.mlx_lm.train` with `GlobalNorm(1.0)`, per-tensor
  norms and the default detectors, spool only (`url=None`: the network is not measured here).
Rounds alternate; the figure is the ratio of the median wall times of `train()`.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import llama
from mlx_lm.tuner import trainer

from gradwatch.agent import GradWatch
from gradwatch.agent.integrations import mlx_lm as gradwatch_mlx_lm
from gradwatch.clip import GlobalNorm


def model() -> nn.Module:
    mx.random.seed(0)
    built = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256))
    mx.eval(built.parameters())
    return built


def data() -> list:
    rng = np.random.default_rng(0)
    return [(rng.integers(1, 256, size=int(rng.integers(16, 48))).tolist(), 0) for _ in range(64)]


def run(kind: str, iters: int, folder: Path) -> float:
    net, optimizer = model(), optim.Adam(learning_rate=1e-3)
    args = trainer.TrainingArgs(batch_size=4, iters=iters, steps_per_report=10**6, steps_per_save=10**6,
                                adapter_file=str(folder / f"{kind}.safetensors"))
    np.random.seed(0)
    started = time.perf_counter()
    if kind == "baseline":
        original = optimizer.update
        optimizer.update = lambda m, g: original(m, optim.clip_grad_norm(g, 1.0)[0])
        trainer.train(net, optimizer, data(), None, args=args)
    else:
        with GradWatch(f"bench-{time.time_ns()}", url=None, clipper=GlobalNorm(1.0),
                       spool_dir=folder / "spool") as watch:
            gradwatch_mlx_lm.train(net, optimizer, data(), None, args=args, watch=watch)
            assert watch.stats.recorded >= iters - 1
    return time.perf_counter() - started


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-mlx-lm-bench-"))
    times: dict[str, list[float]] = {"baseline": [], "watched": []}
    run("baseline", 5, folder)  # warm-up: imports, first compile
    run("watched", 5, folder)
    for _ in range(options.rounds):
        for kind in times:
            times[kind].append(run(kind, options.iters, folder))
    baseline, watched = statistics.median(times["baseline"]), statistics.median(times["watched"])
    n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model().parameters()))
    print(f"mlx-lm train(), {options.iters} iters, tiny llama ({n_params:,} params): "
          f"clip_grad_norm in update {baseline:.2f} s, gradwatch {watched:.2f} s: ratio {watched / baseline:.3f}")
    return {"mlx_lm_baseline_s": baseline, "mlx_lm_watched_s": watched, "mlx_lm_ratio": watched / baseline}


if __name__ == "__main__":
    main()
