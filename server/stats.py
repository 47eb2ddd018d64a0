"""Statistics and threshold recommendations: numpy arrays in, plain dicts out.

Pure functions, no I/O, testable without HTTP. Percentiles are numpy's
default (linear interpolation) over the finite pre-clip norms; a candidate's
clip rate is the exact fraction of those norms strictly above its threshold.
"""
from __future__ import annotations

import math

import numpy as np

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
DRIFT_WARNING_CHANGE = 0.5   # recent median 50 % above (or a third below) the window's


def finite(norms: np.ndarray) -> np.ndarray:
    return norms[np.isfinite(norms)]


def percentiles(finite_norms: np.ndarray) -> dict[str, float | None]:
    if len(finite_norms) == 0:
        return {name: None for name in PERCENTILES}
    values = np.percentile(finite_norms, list(PERCENTILES.values()))
    return {name: float(value) for name, value in zip(PERCENTILES, values)}


def clip_rate_at(ordered: np.ndarray, threshold: float) -> float:
    """Fraction of the (sorted, finite) norms strictly above `threshold` (0.0 for no norms)."""
    if len(ordered) == 0:
        return 0.0
    above = len(ordered) - int(np.searchsorted(ordered, threshold, side="right"))
    return above / len(ordered)


def window_stats(pre_norm: np.ndarray, clipped: np.ndarray | None = None,
                 nonfinite: np.ndarray | None = None) -> dict:
    """count, percentiles, clip rate (steps flagged clipped) and non-finite count of a window.

    `clipped` and `nonfinite` are 0.0/1.0 arrays with NaN where unknown. A step
    counts as non-finite when flagged so or when its pre-clip norm is NaN/Inf.
    """
    good = finite(pre_norm)   # np.percentile partitions: no sort of the run is needed
    count = len(pre_norm)
    bad_norm = ~np.isfinite(pre_norm)
    if nonfinite is not None:
        bad_norm |= nonfinite == 1.0
    clip_rate = None
    if clipped is not None:
        known = ~np.isnan(clipped)
        if known.any():
            clip_rate = float(np.count_nonzero(clipped[known] == 1.0) / np.count_nonzero(known))
    return {
        "count": count,
        "finite": len(good),
        "percentiles": percentiles(good),
        "clip_rate": clip_rate,
        "nonfinite": int(np.count_nonzero(bad_norm)),
        "mean": _scaled(good, np.mean),
        "std": _scaled(good, np.std),
        "min": float(good.min()) if len(good) else None,
        "max": float(good.max()) if len(good) else None,
    }


def _scaled(good: np.ndarray, reduce) -> float | None:
    """mean/std of the finite norms without overflow: 1.7e308 twice sums to inf (issue 11)."""
    if not len(good):
        return None
    scale = float(np.max(np.abs(good)))
    return float(reduce(good / scale) * scale) if scale > 0 else float(reduce(good))


def whatif(pre_norm: np.ndarray, threshold: float) -> dict:
    good = finite(pre_norm)
    clipped = int(np.count_nonzero(good > threshold))
    return {"threshold": threshold, "count": len(good), "clipped": clipped,
            "clip_rate": clipped / len(good) if len(good) else None}


def histogram(pre_norm: np.ndarray, bins: int = 60) -> dict:
    """Counts of the finite norms; log-spaced edges when they span two decades or more."""
    good = finite(pre_norm)
    if len(good) == 0:
        return {"edges": [], "counts": [], "log": False, "count": 0}
    low, high = float(good.min()), float(good.max())
    use_log = low > 0 and high / low >= 100
    if use_log:
        edges = np.geomspace(low, high, bins + 1)
        edges[0], edges[-1] = low, high
    elif low == high:  # one value: a bin around it, kept finite at 1.7e308 (issue 11)
        pad = max(0.5, abs(low) * 2.0**-20)
        top = min(high + pad, float(np.finfo(np.float64).max))
        edges = np.linspace(top - 2 * pad, top, bins + 1)
    else:
        edges = np.linspace(low, high, bins + 1)
    counts, edges = np.histogram(good, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "log": use_log, "count": len(good)}


def drift(finite_norms: np.ndarray, whole_median: float | None = None) -> dict:
    """Median of the first and last tenth of the window (in step order) against the whole window's."""
    n = len(finite_norms)
    if n < 20:
        return {"start_median": None, "recent_median": None, "window_median": None,
                "change": None, "warning": None}
    tenth = max(n // 10, 1)
    start = float(np.median(finite_norms[:tenth]))
    recent = float(np.median(finite_norms[-tenth:]))
    whole = float(np.median(finite_norms)) if whole_median is None else whole_median
    change = (recent - start) / start if start > 0 else None
    warning = None
    if whole > 0 and (recent > whole * (1 + DRIFT_WARNING_CHANGE)
                      or recent < whole / (1 + DRIFT_WARNING_CHANGE)):
        warning = (f"recent norms have drifted: the median of the last {tenth:,} steps is "
                   f"{recent:.4g}, {recent / whole:.2f}x the window's median {whole:.4g}; "
                   f"a shorter window may fit the run as it is now")
    return {"start_median": start, "recent_median": recent, "window_median": whole,
            "change": change, "warning": warning}


def current_threshold(threshold: np.ndarray | None) -> float | None:
    """The run's current clip threshold: the last finite value of its threshold column."""
    if threshold is None:
        return None
    known = threshold[np.isfinite(threshold)]
    return float(known[-1]) if len(known) else None


def covered(steps: np.ndarray) -> dict:
    """Which steps an answer covers: `{start, end, steps}` (None/None/0 for none)."""
    return {"start": int(steps[0]) if len(steps) else None, "end": int(steps[-1]) if len(steps) else None,
            "steps": int(len(steps))}


def recommend(steps: np.ndarray, pre_norm: np.ndarray, threshold: np.ndarray | None = None, *,
              window: int | None = None, target_clip_rate: float | None = None) -> dict:
    """`diagnostics.recommend` on a run's stored norms, with the fields older clients read.

    The threshold comes from the robust rule on a recent window of clean steps
    (docs/diagnostics.md: why not a raw percentile). Added here: `count` (the
    clean steps it is computed from), `clean_window` (`{start, end, steps,
    excluded}`, for the dashboard), `drift` over the window's finite norms and
    `warnings` (drift, a level shift, too few clean steps). ValueError for a
    `target_clip_rate` outside [0, 1) or a `window` below 100.
    """
    from gradwatch.server import diagnostics  # pure numpy; imported here to keep `stats` light

    result = diagnostics.recommend(steps, pre_norm, window=window, target_clip_rate=target_clip_rate,
                                   current_threshold=current_threshold(threshold))
    span = result["window"]
    size = span["steps"]
    window_norms = pre_norm[len(pre_norm) - size:] if size else pre_norm[:0]
    window_finite = finite(window_norms)
    drift_info = drift(window_finite)
    warnings: list[str] = []
    if result["threshold"] is None:
        warnings.append(result["reason"])
    if result["level_shift"]:
        warnings.append("the norms shifted to a new level at step "
                        + ", ".join(f"{s:,}" for s in result["level_shift_steps"])
                        + " in the window; the recommendation is for the regime after it")
    elif drift_info["warning"]:
        warnings.append(drift_info["warning"])
    result.update(
        count=span["clean_steps"], drift=drift_info, warnings=warnings,
        clean_window={"start": span["clean_start"], "end": span["end"] if span["clean_steps"] else None,
                      "steps": span["clean_steps"], "excluded": size - span["clean_steps"]})
    return result


def downsample_indices(pre_norm: np.ndarray, points: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the rows to draw `points` points so that no spike is lost.

    Splits the rows into points/2 buckets of consecutive steps and keeps, per
    bucket, the rows of the smallest and the largest finite pre-clip norm.
    Rows in `keep` (spikes, non-finite norms) are always kept, unless there are
    more of them than `points`. Never samples. With `points` >= rows, every row.
    """
    n = len(pre_norm)
    if points >= n:
        return np.arange(n)
    buckets = max(points // 2, 1)
    size = math.ceil(n / buckets)
    padded = buckets * size
    good = np.isfinite(pre_norm)
    low = np.full(padded, np.inf)
    high = np.full(padded, -np.inf)
    low[:n] = np.where(good, pre_norm, np.inf)
    high[:n] = np.where(good, pre_norm, -np.inf)
    offsets = np.arange(buckets) * size
    low_index = offsets + low.reshape(buckets, size).argmin(axis=1)
    high_index = offsets + high.reshape(buckets, size).argmax(axis=1)
    chosen = [low_index[low_index < n], high_index[high_index < n]]
    extra = np.flatnonzero(~good)
    if keep is not None:
        extra = np.union1d(extra, np.flatnonzero(keep))
    if len(extra) <= points:
        chosen.append(extra)
    return np.unique(np.concatenate(chosen))
