"""A workbench for the spike rule: the adaptive rule step by step in NumPy, and the old one, side by side.

    python benchmarks/rule_lab.py                 # calibration: the tail ratio on Gaussian and Student-t logs
    python benchmarks/rule_lab.py --grid          # recall/false positives of a few settings on every family

The rule this lab settled on lives in ``gradwatch.clip.spike_rule`` (the one
shared NumPy implementation); ``lab_rule`` below is a plain step loop with
every knob exposed, so settings can be tried without touching the package.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from statistics import NormalDist
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

MAD_TO_SIGMA = 1.4826


def lab_rule(values: np.ndarray, *, k_gauss: float = 3.25, power: float = 3.0, quantile: float = 0.95,
             k_min: float = 3.0, k_max: float = 6.0, tail_min: int = 100, history: int = 200,
             warmup: int = 25, shift_window: int = 16, shift_span: int = 8, min_scale: float = 0.01,
             adaptive: bool = True, k_fixed: float = 5.0,
             feed: str = "skip", smooth: float = 0.0,
             side: str = "upper_mean", entry_k: float | None = None, burst_k: float | None = None,
             shift_base_k: bool = False, chain_only_confirmed: bool = False) -> dict[str, np.ndarray]:
    """The adaptive rule over norms (log space), one step at a time.

    k = clip(k_gauss · (tail / tail_gauss)^power, k_min, k_max), tail by ``side``:
    "upper_mean" (the shared rule's): (mean of h's values above its ``quantile`` − m) / MAD(h);
    "both" (the first adaptive rule): Q_quantile(|h − m|) / MAD(h); "upper" / "lower": one tail's
    order statistic at the same rank, over MAD(h). tail_gauss: the same ratio for a normal
    sample; k_max while fewer than ``tail_min`` values are in
    the history. Shift: more than half of the last ``shift_window`` raw values above the bound for
    ``shift_span`` consecutive steps; the history becomes the recent values within the newest
    half's median ± k·scale.
    """
    gauss = NormalDist()
    if side == "upper_mean":   # E[X | X > z_q] / z_0.75
        tail_gauss = gauss.pdf(gauss.inv_cdf(quantile)) / (1 - quantile) / gauss.inv_cdf(0.75)
    else:
        tail_gauss = gauss.inv_cdf(0.5 + quantile / 2) / gauss.inv_cdf(0.75)
    x = np.asarray(values, np.float64)
    n = len(x)
    finite = np.isfinite(x)
    lx = np.log(np.maximum(np.where(finite, x, 1.0), 1e-30))
    spike = ~finite
    shift = np.zeros(n, bool)
    transition = np.zeros(n, bool)
    k_used = np.full(n, np.nan)
    score = np.zeros(n)
    ring = np.zeros(history)
    filled = seen = run = 0
    tail = None
    confirmed = False
    recent: list[tuple[int, float, bool]] = []
    for i in range(n):
        if not finite[i]:
            continue
        value = lx[i]
        flagged = False
        fed = value
        bound = math.inf
        if seen >= warmup:
            h = ring[:min(filled, history)]
            m = float(np.median(h))
            dev = np.sort(np.abs(h - m))
            mad = float(np.median(dev))
            s = max(MAD_TO_SIGMA * mad, min_scale)
            if adaptive:
                if len(h) >= tail_min and mad > 0:
                    if side == "both":
                        q = float(np.quantile(dev, quantile, method="lower"))
                    elif side == "lower":   # the lower tail only: spikes are one-sided and never reach it
                        q = m - float(np.sort(h)[int((1 - quantile) / 2 * (len(h) - 1))])
                    elif side == "upper":   # the upper tail only: the side the one-sided rule judges
                        q = float(np.sort(h)[int((1 + quantile) / 2 * (len(h) - 1))]) - m
                    else:   # "upper_mean": the mean of the values above the quantile, less the median
                        count = len(h) - int(np.floor(round(quantile * len(h), 9)))
                        q = float(np.mean(np.sort(h)[-count:])) - m
                    ratio = q / mad
                    tail = ratio if (smooth == 0 or tail is None) else tail + smooth * (ratio - tail)
                    k = min(max(k_gauss * (tail / tail_gauss) ** power, k_min), k_max)
                else:
                    k = k_max
            else:
                k = k_fixed
            k_base = k
            if burst_k is not None and recent and recent[-1][2] and (not chain_only_confirmed or confirmed):
                k = min(k, burst_k)   # the step after a flagged one: a burst goes on at a lower bar
            k_used[i] = k
            z = (value - m) / s
            score[i] = z
            bound = m + (k_base if shift_base_k else k) * s
            flagged = z > k
            confirmed = z > k_base
            fed = min(value, bound) if feed == "cap" else (m if feed == "median" else value)
        enters = not (flagged and feed == "skip")
        if entry_k is not None and seen >= warmup and score[i] > entry_k:
            enters = False   # a suspect value (above median + entry_k·s) stays out even when not flagged
        if enters:
            ring[filled % history] = fed
            filled += 1
        seen += 1
        recent.append((i, value, flagged))
        if len(recent) > shift_window:
            recent.pop(0)
        above = sum(v > bound for _, v, _ in recent)
        newest = sum(v > bound for _, v, _ in recent[-(shift_window // 2):])
        run = run + 1 if (above > shift_window // 2 and newest > shift_window // 4) else 0
        if flagged and run >= shift_span:
            shift[i] = True
            for j, _, was in recent:
                if was and j != i:
                    transition[j] = True
                    spike[j] = False
            vals = np.array([v for _, v, _ in recent])
            nm = float(np.median(vals))
            ns = max(MAD_TO_SIGMA * float(np.median(np.abs(vals - nm))), min_scale)
            keep = vals[np.abs(vals - nm) <= k * ns]
            ring[:len(keep)] = keep
            filled = len(keep)
            run = 0
            recent = [(j, v, False) for j, v, _ in recent]
        elif flagged:
            spike[i] = True
    return {"spike": spike, "level_shift": shift, "transition": transition, "score": score, "k": k_used}


def old_rule_loop(values: np.ndarray, k: float = 5.0, history: int = 200, warmup: int = 25,
                  shift_window: int = 20, shift_count: int = 10, min_scale: float = 0.01) -> dict[str, np.ndarray]:
    """The issue-9 rule, kept here to measure against: fixed k, spikes enter the history capped at
    the bound, a level shift when more than ``shift_count`` of the last ``shift_window`` were flagged
    (the history becomes those raw values, burst included)."""
    x = np.asarray(values, np.float64)
    n = len(x)
    finite = np.isfinite(x)
    lx = np.log(np.maximum(np.where(finite, x, 1.0), 1e-30))
    spike, shift, transition = ~finite, np.zeros(n, bool), np.zeros(n, bool)
    ring = np.zeros(history)
    filled = seen = 0
    recent: list[tuple[int, float, bool]] = []
    for i in range(n):
        if not finite[i]:
            continue
        value, fed, flagged = lx[i], lx[i], False
        if seen >= warmup:
            h = ring[:min(filled, history)]
            m = float(np.median(h))
            s = max(MAD_TO_SIGMA * float(np.median(np.abs(h - m))), min_scale)
            flagged = (value - m) / s > k
            fed = min(value, m + k * s)
        ring[filled % history] = fed
        filled += 1
        seen += 1
        recent.append((i, value, flagged))
        if len(recent) > shift_window:
            recent.pop(0)
        if flagged and sum(f for _, _, f in recent) > shift_count:
            shift[i] = True
            for j, _, was in recent:
                if was and j != i:
                    transition[j], spike[j] = True, False
            ring[:len(recent)] = [v for _, v, _ in recent]
            filled = len(recent)
            recent = [(j, v, False) for j, v, _ in recent]
        elif flagged:
            spike[i] = True
    return {"spike": spike, "level_shift": shift, "transition": transition}


def tail_ratio(h: np.ndarray, estimator: str, quantile: float = 0.95) -> float:
    """One history's tail ratio, by the estimators the lab compares (see lab_rule's ``side``)."""
    m = np.median(h)
    mad = np.median(np.abs(h - m))
    if estimator == "both":
        return float(np.quantile(np.abs(h - m), quantile, method="lower") / mad)
    if estimator == "upper":
        return float((np.sort(h)[int((1 + quantile) / 2 * (len(h) - 1))] - m) / mad)
    count = len(h) - int(np.floor(round(quantile * len(h), 9)))
    return float((np.mean(np.sort(h)[-count:]) - m) / mad)


def calibration(samples: int = 3000, size: int = 200, quantile: float = 0.95) -> None:
    """The tail ratio of `size` log values by each estimator: its median and relative spread for
    normal and Student-t tails, and how far apart normal and t(4) are in units of that spread
    (what decides how well k can follow the tail); the k a 0.3% one-sided rate needs."""
    rng = np.random.default_rng(0)
    noises = (("normal", lambda m=size: rng.standard_normal(m)),
              ("student-t(10)", lambda m=size: rng.standard_t(10, m)),
              ("student-t(6)", lambda m=size: rng.standard_t(6, m)),
              ("student-t(4)", lambda m=size: rng.standard_t(4, m)),
              ("student-t(3)", lambda m=size: rng.standard_t(3, m)))
    print(f"k (σ units) a 0.3% one-sided false-positive rate needs: " + ", ".join(
        f"{label} {np.quantile(big := draw(2_000_000), 1 - 0.003) / (MAD_TO_SIGMA * np.median(np.abs(big))):.2f}"
        for label, draw in noises))
    for estimator, label in (("both", f"Q{quantile:g}(|h - m|) / MAD (two-sided, the first adaptive rule)"),
                             ("upper", f"upper order statistic at rank {(1 + quantile) / 2:g} / MAD"),
                             ("upper_mean", f"(mean of the values above Q{quantile:g} - m) / MAD (the shared rule)")):
        print(f"\ntail = {label}, over {size} values ({samples} draws each)")
        print(f"{'noise':<16}{'median':>8}{'cv':>8}")
        rows = {}
        for name, draw in noises:
            ratios = np.array([tail_ratio(draw(), estimator, quantile) for _ in range(samples)])
            rows[name] = (np.median(ratios), np.std(ratios) / np.median(ratios))
            print(f"{name:<16}{rows[name][0]:>8.3f}{rows[name][1]:>8.3f}")
        separation = np.log(rows["student-t(4)"][0] / rows["normal"][0]) / rows["student-t(4)"][1]
        print(f"normal vs t(4): log ratio of medians / cv of t(4) = {separation:.2f} (higher: k follows the tail better)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.grid:
        calibration()
    else:
        from benchmarks.spike_recall import evaluate, print_summary
        grid = [("old (k=5, count shift)", None), ("adaptive (lab defaults = the shared rule's)", dict()),
                ("adaptive, shift span 9", dict(shift_span=9)), ("adaptive, k_gauss 3", dict(k_gauss=3.0)),
                ("adaptive, q = 0.9, power 3", dict(quantile=0.9, power=3.0)),
                ("adaptive, flagged values enter capped", dict(feed="cap")),
                ("adaptive, suspects (z > 3) kept out of the history too", dict(entry_k=3.0)),
                ("adaptive, the step after a flag judged at k <= 3 (burst hysteresis)", dict(burst_k=3.0)),
                ("adaptive, lower-tail quantile only", dict(side="lower")),
                ("first adaptive rule (two-sided Q0.95, power 2.5, k_max 5.5)",
                 dict(side="both", power=2.5, k_max=5.5)),
                ("upper order statistic (rank 0.975), power 2.5, k_max 5.5", dict(side="upper", power=2.5, k_max=5.5)),
                ("upper mean, power 2.5", dict(power=2.5)), ("upper mean, k_max 5.5", dict(k_max=5.5)),
                ("burst hysteresis k <= 3.25 after a flag (two-sided)", dict(side="both", power=2.5, k_max=5.5,
                                                                            burst_k=3.25)),
                ("fixed k = 3.25 (new shift rule)", dict(adaptive=False, k_fixed=3.25)),
                ("fixed k = 5 (new shift rule)", dict(adaptive=False, k_fixed=5.0))]
        for label, kw in grid:
            rule = (lambda v, kw=kw: lab_rule(v, **kw)) if kw is not None else old_rule_loop
            print_summary(label, evaluate(rule, quick=True))
    print(f"total {time.perf_counter() - started:.0f}s")
