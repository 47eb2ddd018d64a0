"""Window statistics (percentiles, clip rates, what-if, histogram, drift) and the API's
recommendation answer: numpy arrays in, plain dicts out.

The threshold itself is computed in one place, `diagnostics.recommend`; `recommend` here
adds the fields around it that the API, the dashboard and `gradwatch recommend` read.

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
    """How many of the finite norms lie strictly above `threshold`: the same division as the
    recommendation's `clip_rate_raw`, so one threshold over one span gives one number."""
    good = finite(pre_norm)
    clipped = int(np.count_nonzero(good > threshold))
    return {"threshold": threshold, "count": len(good), "clipped": clipped,
            "clip_rate": clipped / len(good) if len(good) else None}


def rate_window_start(result: dict) -> int | None:
    """Where the recommendation's raw clip rates start: the window's first step, or the first
    clean step after a level shift (the regime the threshold is for)."""
    span = result["window"]
    if result.get("level_shift") and span.get("clean_start") is not None:
        return int(span["clean_start"])
    return span["start"]


def rate_span(steps: np.ndarray, pre_norm: np.ndarray, result: dict) -> tuple[np.ndarray, dict]:
    """The rate window of a recommendation over `steps`/`pre_norm` (its window is their last
    `window.steps` rows): its pre-clip norms and `{start, end, steps, finite, after_level_shift}`."""
    size = result["window"]["steps"]
    w_steps = steps[len(steps) - size:] if size else steps[:0]
    w_norms = pre_norm[len(pre_norm) - size:] if size else pre_norm[:0]
    start = rate_window_start(result)
    if start is not None:
        keep = w_steps >= start
        w_steps, w_norms = w_steps[keep], w_norms[keep]
    span = covered(w_steps)
    span.update(finite=int(np.count_nonzero(np.isfinite(w_norms))),
                after_level_shift=bool(result.get("level_shift")) and start != result["window"]["start"])
    return w_norms, span


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
              window: int | None = None, target_clip_rate: float | None = None,
              optimizer: str | None = None) -> dict:
    """`diagnostics.recommend` on a run's stored norms, with the fields older clients read.

    The threshold comes from the robust rule on a recent window of clean steps
    (docs/diagnostics.md: why not a raw percentile). Added here: `count` (the
    clean steps it is computed from), `clean_window` (`{start, end, steps,
    excluded}`, for the dashboard), `drift` over the window's finite norms and
    `warnings` (drift, a level shift, too few clean steps). ValueError for a
    `target_clip_rate` outside [0, 1) or a `window` below 100.
    """
    from gradwatch.server.analysis import diagnostics  # pure numpy; imported here to keep `stats` light

    result = diagnostics.recommend(steps, pre_norm, window=window, target_clip_rate=target_clip_rate,
                                   current_threshold=current_threshold(threshold), optimizer=optimizer)
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
    _raw_rates_over_rate_window(result, steps, pre_norm)
    return result


def _raw_rates_over_rate_window(result: dict, steps: np.ndarray, pre_norm: np.ndarray) -> None:
    """Every `*_raw` clip rate over the rate window (`rate_window`: the finite norms from
    `window.start`, or from `clean_start` after a level shift), the span the dashboard's
    headline and what-if, `gradwatch recommend` and the report all quote."""
    norms, span = rate_span(steps, pre_norm, result)
    raw = finite(norms)
    result["rate_window"] = span

    def rate(threshold: float | None) -> float | None:
        return whatif(raw, threshold)["clip_rate"] if threshold is not None else None

    before = result.get("clip_rate_raw")
    for key, threshold in (("clip_rate_raw", result["threshold"]),
                           ("current_clip_rate_raw", result.get("current_threshold")),
                           ("clip_rate_at_1_raw", 1.0 if result["threshold"] is not None else None)):
        result[key] = rate(threshold)
    over = (f"steps {span['start']:,}–{span['end']:,}" if span["steps"] else "no steps")
    for candidate in result.get("candidates", []):
        candidate["clip_rate_raw"] = rate(candidate["threshold"])
        candidate["over_raw"] = over
    if result["threshold"] is not None and span["steps"]:
        tail = f" and {_pct(before)} of all steps in the window."
        said = (f" and {_pct(result['clip_rate_raw'])} of the {span['finite']:,} finite steps "
                f"{span['start']:,}–{span['end']:,}"
                + (" (since the level shift)." if span["after_level_shift"] else "."))
        text = result["rationale"]
        result["rationale"] = text[:-len(tail)] + said if text.endswith(tail) else text


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f}%".replace(".00%", "%")


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
