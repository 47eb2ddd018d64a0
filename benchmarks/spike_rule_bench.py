"""The robust spike rule's fast path against the step-by-step loop, in the same run.

``robust_spikes`` (blocks of steps judged at once with NumPy) and ``robust_loop``
(``RobustRule.judge`` one step at a time) on 20,400 steps (a recommendation's
window of 20,000 steps and its 400 of history), alternated, medians of the
repeats; the answers are checked equal first. Then the recommendation of a
1,000,000-step run (``gradwatch.server.analysis.diagnostics.recommend``: the rule forward
and backward over the last 20,400 steps) with each (goal: <= 150 ms).

    python benchmarks/spike_rule_bench.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch.clip.spike_rule import robust_loop, robust_spikes  # noqa: E402
from gradwatch.server.analysis import diagnostics  # noqa: E402

WINDOW = 20_400
GOAL_MS = 150.0


def server_bench_norms(steps: int, seed: int = 0) -> np.ndarray:
    """The pre-clip norms of benchmarks/server_bench.py's run (log-normal, 0.1% spikes x20)."""
    rng = np.random.default_rng(seed)
    pre = np.exp(rng.normal(0.0, 0.3, steps))
    pre[rng.choice(steps, max(steps // 1000, 1), replace=False)] *= 20.0
    return pre


def heavy_norms(steps: int, seed: int = 1) -> np.ndarray:
    """Student-t(3) log norms, 1% spikes, bursts, a 10x level shift, a few NaN: many flags."""
    rng = np.random.default_rng(seed)
    pre = np.exp(0.25 * rng.standard_t(3, steps))
    pre[rng.choice(steps, steps // 100, replace=False)] *= rng.uniform(3, 50, steps // 100)
    for start in rng.choice(steps - 20, steps // 2000, replace=False):
        pre[start:start + 10] *= 20.0
    pre[steps // 2:] *= 10.0
    pre[rng.choice(steps, 10, replace=False)] = np.nan
    return pre


def alternate(candidate, baseline, repeats: int) -> tuple[float, float]:
    """Median seconds of each, run in turn (the machine is shared: alternation spreads the load)."""
    fast, slow = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        candidate()
        fast.append(time.perf_counter() - started)
        started = time.perf_counter()
        baseline()
        slow.append(time.perf_counter() - started)
    return statistics.median(fast), statistics.median(slow)


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in
               ("spike", "level_shift", "transition", "ready")) and np.array_equal(a.score, b.score, equal_nan=True)


def main(repeats: int = 7) -> dict:
    figures: dict[str, float] = {}
    print(f"robust spike rule on {WINDOW:,} steps: fast path vs the step-by-step loop "
          f"(medians of {repeats}, alternated, same run)")
    for name, norms in (("server_bench", server_bench_norms(WINDOW)), ("heavy", heavy_norms(WINDOW))):
        fast_found, loop_found = robust_spikes(norms), robust_loop(norms)
        assert same(fast_found, loop_found), name
        fast_s, loop_s = alternate(lambda: robust_spikes(norms), lambda: robust_loop(norms), repeats)
        flags = int(loop_found.spike.sum() + loop_found.transition.sum())
        print(f"  {name:<13} {flags:5d} flags, {int(loop_found.level_shift.sum())} level shift(s): "
              f"fast {fast_s * 1e3:6.1f} ms, loop {loop_s * 1e3:6.1f} ms, loop/fast {loop_s / fast_s:5.1f}x")
        figures[f"{name}_fast_ms"], figures[f"{name}_loop_ms"] = fast_s * 1e3, loop_s * 1e3
    steps = np.arange(1_000_000)
    norms = server_bench_norms(1_000_000)

    def with_loop():
        diagnostics.robust_spikes = robust_loop
        try:
            return diagnostics.recommend(steps, norms)
        finally:
            diagnostics.robust_spikes = robust_spikes

    assert diagnostics.recommend(steps, norms) == with_loop()
    fast_s, loop_s = alternate(lambda: diagnostics.recommend(steps, norms), with_loop, repeats)
    verdict = "met" if fast_s * 1e3 <= GOAL_MS else "MISSED"
    print(f"  recommend() on a 1,000,000-step run (server_bench norms): fast {fast_s * 1e3:6.1f} ms, "
          f"loop {loop_s * 1e3:6.1f} ms, loop/fast {loop_s / fast_s:5.1f}x (goal <= {GOAL_MS:.0f} ms: {verdict})")
    figures["recommend_fast_ms"], figures["recommend_loop_ms"] = fast_s * 1e3, loop_s * 1e3
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    main(parser.parse_args().repeats)
