"""The pure statistics module against numpy, without HTTP."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.server.analysis import stats
from gradwatch.server.wire import BatchError, parse_batch


def norms(n: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(0, 0.4, n))
    values[::101] = np.nan
    values[::211] = np.inf
    return values


def test_window_stats_equal_numpy_over_finite_norms():
    values = norms()
    clipped = (values > 1.3).astype(float)
    clipped[::7] = np.nan  # unknown
    result = stats.window_stats(values, clipped, None)
    good = values[np.isfinite(values)]
    assert result["count"] == len(values) and result["finite"] == len(good)
    assert list(result["percentiles"].values()) == np.percentile(good, [50, 90, 95, 99, 99.9]).tolist()
    known = ~np.isnan(clipped)
    assert result["clip_rate"] == (clipped[known] == 1).mean()
    assert result["nonfinite"] == int((~np.isfinite(values)).sum())


def clean_norms(n: int = 5000, seed: int = 0) -> np.ndarray:
    """Norms uniform in log space (±0.2: nothing beyond 1.4 robust sigmas, so no rule calls one a
    spike, whatever its k) with NaN/inf: every finite norm is clean."""
    values = np.exp(np.random.default_rng(seed).uniform(-0.2, 0.2, n))
    values[::101] = np.nan
    values[::211] = np.inf
    return values


def test_recommendation_is_the_robust_rule_or_the_target_quantile_on_the_clean_window():
    values = clean_norms()
    steps = np.arange(len(values))
    threshold = np.full(len(values), 1.0)
    rec = stats.recommend(steps, values, threshold, window=len(values))
    good = values[np.isfinite(values)]
    logs = np.log(good)
    mad = np.median(np.abs(logs - np.median(logs)))
    tau = min(max(math.exp(np.median(logs) + 3 * 1.4826 * mad), np.median(good)), 10 * np.median(good))
    assert rec["threshold"] == pytest.approx(tau, rel=1e-12) and rec["count"] == len(good)
    assert rec["spikes_left_out"] == 0 and rec["nonfinite_left_out"] == len(values) - len(good)
    by_label = {c["label"]: c for c in rec["candidates"]}
    assert by_label["current"]["threshold"] == 1.0 and rec["current_threshold"] == 1.0
    for candidate in rec["candidates"]:
        assert candidate["clip_rate"] == np.count_nonzero(good > candidate["threshold"]) / len(good)
    assert rec["clean_window"] == {"start": 1, "end": len(values) - 1, "steps": len(good),
                                   "excluded": len(values) - len(good)}
    quantile = stats.recommend(steps, values, threshold, target_clip_rate=0.05)
    default = values[-500:]  # default window: 10% of 5,000 is below the 500-step floor
    assert quantile["threshold"] == np.quantile(default[np.isfinite(default)], 0.95)
    assert "95th percentile" in quantile["rationale"] and quantile["window"]["steps"] == 500


def test_drift_warning_when_recent_norms_move_far_from_the_window():
    steady = np.exp(np.random.default_rng(1).normal(0, 0.1, 4000))
    steps = np.arange(len(steady))
    assert stats.recommend(steps, steady)["drift"]["warning"] is None
    drifting = steady * np.linspace(1.0, 4.0, len(steady))
    rec = stats.recommend(steps, drifting, window=4000)
    assert rec["drift"]["warning"] and rec["drift"]["warning"] in rec["warnings"]
    assert rec["drift"]["change"] > 0.5


def test_recommendation_without_enough_clean_norms_says_so():
    rec = stats.recommend(np.arange(2), np.array([np.nan, np.inf]))
    assert rec["threshold"] is None and rec["candidates"] == [] and "0 clean steps" in rec["reason"]
    assert rec["warnings"] == [rec["reason"]] and rec["clean_window"]["steps"] == 0
    with pytest.raises(ValueError, match="target_clip_rate"):
        stats.recommend(np.arange(5000), clean_norms(), target_clip_rate=1.5)
    with pytest.raises(ValueError, match="window"):
        stats.recommend(np.arange(5000), clean_norms(), window=99)


def test_histogram_uses_log_edges_across_decades():
    wide = np.geomspace(0.01, 100, 1000)
    result = stats.histogram(wide, bins=20)
    assert result["log"] and sum(result["counts"]) == 1000
    assert np.allclose(np.diff(np.log(result["edges"])), np.log(1e4) / 20)
    narrow = stats.histogram(np.linspace(1, 2, 100), bins=10)
    assert not narrow["log"] and narrow["counts"] == np.histogram(np.linspace(1, 2, 100), 10)[0].tolist()


@pytest.mark.parametrize("n, points", [(10, 100), (1000, 100), (100_003, 2000), (50, 20)])
def test_downsample_keeps_bucket_extremes_and_flagged_rows(n, points):
    rng = np.random.default_rng(n)
    values = rng.random(n)
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, min(5, n), replace=False)] = True
    values[n // 2] = np.nan
    chosen = stats.downsample_indices(values, points, keep)
    if points >= n:
        assert chosen.tolist() == list(range(n))
        return
    assert set(np.flatnonzero(keep)) <= set(chosen.tolist()) and n // 2 in chosen
    assert len(chosen) <= points + keep.sum() + 1 and np.all(np.diff(chosen) > 0)
    assert np.nanargmax(values) in chosen and np.nanargmin(values) in chosen


def test_parse_batch_validates_columns_with_field_names():
    batch = parse_batch({"step": [0, 1, 2], "pre_norm": [1, "NaN", "Infinity"], "lr": [None, 0.1, None],
                         "clipped": [True, None, 0]})
    assert batch.steps.tolist() == [0, 1, 2]
    pre = batch.columns["pre_norm"].values
    assert pre[0] == 1.0 and math.isnan(pre[1]) and pre[2] == math.inf
    assert batch.columns["lr"].missing.tolist() == [True, False, True]
    assert batch.columns["clipped"].values[0] == 1.0 and math.isnan(batch.columns["clipped"].values[1])
    for bad, field in [({"step": [0], "pre_norm": [None]}, "pre_norm"),
                       ({"step": [True], "pre_norm": [1.0]}, "step"),
                       ({"step": [0], "pre_norm": ["inf"]}, "pre_norm"),
                       ({"step": [0], "pre_norm": [1.0], "loss": [[1.0]]}, "loss"),
                       ({"step": [2**70], "pre_norm": [1.0]}, "step")]:
        with pytest.raises(BatchError, match=field):
            parse_batch(bad)


def test_raw_clip_rates_are_over_the_rate_window_and_equal_the_whatif():
    rng = np.random.default_rng(3)
    values = np.exp(rng.normal(0, 0.1, 3000))
    values[[2700, 2800, 2900]] *= 40.0
    values[2750] = np.nan
    steps = np.arange(10, 3010)  # steps need not start at 0
    result = stats.recommend(steps, values)
    span = result["rate_window"]
    assert not result["level_shift"] and span["start"] == result["window"]["start"] == steps[-500]
    part = values[-500:]
    finite = part[np.isfinite(part)]
    assert span == {"start": int(steps[-500]), "end": 3009, "steps": 500, "finite": 499, "after_level_shift": False}
    for candidate in result["candidates"]:
        assert candidate["clip_rate_raw"] == (finite > candidate["threshold"]).mean()
        assert candidate["clip_rate_raw"] == stats.whatif(part, candidate["threshold"])["clip_rate"]
    assert result["clip_rate_raw"] == (finite > result["threshold"]).mean()
    assert f"of the 499 finite steps {steps[-500]:,}–3,009" in result["rationale"]
