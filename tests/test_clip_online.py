"""RecommendedClip against a NumPy loop of the same rule and against the server's recommendation."""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from gradwatch.clip import RecommendedClip
from gradwatch.server.analysis.diagnostics import recommend, robust_spikes

MAD_TO_SIGMA = 1.4826


def norm_sequence(n: int = 700, seed: int = 0) -> np.ndarray:
    """A drifting lognormal norm with 30x spikes and a NaN, float32 like the clipper's norms."""
    rng = np.random.default_rng(seed)
    x = np.exp(np.linspace(0.0, -1.0, n) + rng.normal(0.0, 0.15, n))
    x[[150, 151, 300, 420, 555]] *= 30.0
    x[480] = np.nan
    return x.astype(np.float32).astype(np.float64)


def reference_thresholds(norms: np.ndarray, window: int, k: float, warmup: int,
                         fallback: float | None) -> list[float]:
    """τ of each step from the last `window` clean log norms before it (the rule written out)."""
    found = robust_spikes(norms)  # the server's NumPy detector, same defaults as RobustDetector
    clean = np.isfinite(norms) & ~found.spike & ~found.level_shift
    out, kept = [], []
    for i, x in enumerate(norms):
        if len(kept) >= warmup:
            h = np.log(np.asarray(kept[-window:]))
            median_log = np.median(h)
            mad = np.median(np.abs(h - median_log))
            median = np.median(np.asarray(kept[-window:]))
            out.append(min(max(math.exp(median_log + k * MAD_TO_SIGMA * mad), median), 10 * median))
        else:
            out.append(math.inf if fallback is None else fallback)
        if clean[i]:
            kept.append(x)
    return out


def run(clipper: RecommendedClip, norms: np.ndarray, compiled: bool = False):
    step = (mx.compile(lambda g: clipper(g), inputs=clipper.state, outputs=clipper.state)
            if compiled else clipper)
    thresholds, scales = [], []
    for x in norms:
        _, info = step({"w": mx.array([float(x)], dtype=mx.float32)})
        mx.eval(info.threshold, info.scale)
        thresholds.append(info.threshold.item())
        scales.append(info.scale.item())
    return np.asarray(thresholds), np.asarray(scales)


@pytest.mark.parametrize("window,warmup,fallback", [(200, 100, None), (64, 30, 2.0)])
def test_thresholds_equal_a_numpy_loop_of_the_rule(window, warmup, fallback):
    norms = norm_sequence()
    got, scales = run(RecommendedClip(window=window, warmup=warmup, fallback=fallback), norms)
    want = np.asarray(reference_thresholds(norms, window, 3.0, warmup, fallback))
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5)
    # The spikes after warm-up were clipped to τ; clean steps mostly pass.
    for i in (300, 420, 555):
        assert scales[i] == pytest.approx(want[i] / (norms[i] + 1e-6), rel=1e-5)
    assert np.mean(scales[warmup:][np.isfinite(norms[warmup:])] < 1) < 0.05


def test_compiled_equals_eager():
    norms = norm_sequence(seed=1)
    eager, _ = run(RecommendedClip(window=100, warmup=50), norms)
    compiled, _ = run(RecommendedClip(window=100, warmup=50), norms, compiled=True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-6)


def test_equals_the_server_recommendation_on_the_same_window():
    rng = np.random.default_rng(7)
    n = 300
    norms = np.exp(0.3 + rng.normal(0.0, 0.1, n)).astype(np.float32).astype(np.float64)
    server = recommend(np.arange(n), norms, window=n)
    assert server["spikes_left_out"] == 0 and server["window"]["clean_steps"] == n
    clip = RecommendedClip(window=n, warmup=100)
    for x in norms:
        clip({"w": mx.array([float(x)], dtype=mx.float32)})
    _, info = clip({"w": mx.array([1.0])})  # τ for the next step: the window holds exactly the n norms
    assert info.threshold.item() == pytest.approx(server["threshold"], rel=2e-5)


def test_warmup_clips_nothing_without_fallback_and_bad_arguments_are_refused():
    _, info = RecommendedClip(window=10, warmup=5)({"w": mx.array([1e6])})
    assert info.scale.item() == 1.0 and not info.clipped.item() and math.isinf(info.threshold.item())
    _, info = RecommendedClip(window=10, warmup=5, fallback=2.0)({"w": mx.array([4.0])})
    assert info.threshold.item() == 2.0 and info.scale.item() == pytest.approx(2.0 / (4.0 + 1e-6))
    with pytest.raises(ValueError, match="warmup"):
        RecommendedClip(window=10, warmup=20)
    with pytest.raises(ValueError):
        RecommendedClip(k=0)
