"""The robust spike rule in NumPy and plain Python: one implementation for the agent and the server.

The agent's host detector (``gradwatch.agent.host_detector``, one step late in
the sender thread) and the server's diagnostics (``gradwatch.server.diagnostics``)
both call this module, so what the agent sends and what the server finds
cannot drift apart. The in-graph :class:`~gradwatch.clip.robust.RobustDetector`
applies the same rule as MLX ops, for the cases where the same step must act
on it (``skip_spikes``, ``RecommendedClip``); tests hold its flags to these.

Pure NumPy: importing this module imports neither MLX nor anything else of
``gradwatch.clip`` (the package's ``__init__`` loads its MLX modules lazily),
so the server never loads MLX.

The rule, per finite value v (``l = log v`` for norms, ``l = v`` for losses,
which can be <= 0), against the history h of the last ``history`` earlier
values that were not flagged::

    m = median(h);  d = |h - m| sorted;  s = max(1.4826·median(d), floor);  score = (l - m) / s
    k = clip(k_gauss · (tail / tail_gauss)^power, k_min, k_max),  tail = d[⌊q·(n-1)⌋] / median(d)
    spike = score > k (one-sided);  h ← h + [l] only when l is not a spike

The bound adapts to the tail the history shows: ``tail`` is the ratio of an upper
quantile (q = 0.95) of the absolute deviations to their median, read from the sort
the MAD already needs; for normal noise it is ``tail_gauss`` (1.96 / 0.6745 =
2.906) and k = ``k_gauss`` (3.25), for Student-t(4) noise it is about 3.7 and
k at its cap 5.5 (``benchmarks/rule_lab.py`` prints the calibration). Until the history
holds ``tail_min`` (100) values, or when ``k`` is given, k is fixed (``k_max`` / ``k``).
A flagged value never enters the history, so spikes do not inflate the tail estimate.

``floor`` is ``min_scale`` in log space and ``min_scale·|m|`` in linear space.
Nothing is flagged before ``warmup`` finite values were seen. Non-finite
values are spikes and enter nothing.

Level shift (a new level that persists, never a burst): the median of the last
``shift_window`` (16) finite raw values lies above the current bound ``m + k·s``
(more than half of them are above it) and so do more than half of the newest
``shift_window / 2``, for ``shift_span`` (8) consecutive finite steps, and this
step is flagged. That step is the ``level_shift`` (not a spike); the flags of the
recent window become "transition"; the history becomes the recent raw values
that lie within their own median ± k·1.4826·MAD (never a burst's values), oldest
first. A genuine change whose values all clear the old bound is followed after
``shift_window / 2 + shift_span`` = 16 flags (with ``skip_spikes=True``: at most
16 skipped updates); a burst of up to 14 elevated steps (6 corrupted batches and 8
of aftermath) followed by a return never is.
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): the MAD of a normal sample times this is its σ
TINY = 1e-30  # log floor: a zero norm is low, never a spike, and never -inf in the history

# The defaults of the rule (docs/diagnostics.md says why, with the measurements).
K = None            # None: k adapts to the tail; a number fixes it
K_GAUSS = 3.25      # k for a normal tail
K_MIN = 3.0
K_MAX = 5.5         # also k while the history is short
TAIL_QUANTILE = 0.95
TAIL_POWER = 2.5
TAIL_MIN = 100
HISTORY = 200
WARMUP = 25
SHIFT_WINDOW = 16
SHIFT_SPAN = 8
MIN_SCALE = 0.01


def tail_gauss(quantile: float = TAIL_QUANTILE) -> float:
    """``tail`` of a normal sample: Φ⁻¹(1/2 + q/2) / Φ⁻¹(3/4)."""
    normal = NormalDist()
    return normal.inv_cdf(0.5 + quantile / 2) / normal.inv_cdf(0.75)


def quantile_fraction(quantile: float) -> tuple[int, int]:
    """q as a fraction (numerator, denominator): the rank ⌊q·(n-1)⌋ is computed in integers,
    so NumPy and MLX (float32) read the same order statistic."""
    frac = Fraction(quantile).limit_denominator(1000)
    return frac.numerator, frac.denominator


def tail_rank(n: int, quantile: float = TAIL_QUANTILE) -> int:
    num, den = quantile_fraction(quantile)
    return (n - 1) * num // den


def adaptive_k(tail: float, *, k_gauss: float = K_GAUSS, k_min: float = K_MIN, k_max: float = K_MAX,
               power: float = TAIL_POWER, quantile: float = TAIL_QUANTILE) -> float:
    """k for a history whose ``tail`` (upper-quantile deviation / MAD) is given."""
    return min(max(k_gauss * (tail / tail_gauss(quantile)) ** power, k_min), k_max)


def check_params(k: float | None, history: int, warmup: int, shift_window: int, shift_span: int,
                 min_scale: float) -> None:
    if shift_window > history or shift_window < 2:
        raise ValueError(f"need 2 <= shift_window <= history, got shift_window={shift_window}, history={history}")
    if shift_span < 1:
        raise ValueError(f"shift_span must be >= 1, got {shift_span}")
    if k is not None and not k > 0:
        raise ValueError(f"k must be > 0 or None (adaptive), got {k!r}")


class Verdict(NamedTuple):
    """What the rule says of one value: ``score`` (0 during warm-up, NaN for a NaN value,
    inf for an infinite one), ``spike`` (non-finite values included), ``level_shift``
    (the step that starts a new regime; never also a spike), ``ready`` (past warm-up)."""

    score: float
    spike: bool
    level_shift: bool
    ready: bool


def _sorted_median(ordered: list[float]) -> float:
    """The median of a sorted list as NumPy computes it (the mean of the two middle values)."""
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _deviation_kth(ordered: list[float], median: float):
    """``kth(rank)``: the rank-th smallest of ``|ordered - median|`` (0-based), as NumPy computes it.

    The deviations below the median, read downwards, and those above it, read upwards,
    are two sorted sequences; each order statistic of their union is found by a
    binary search (no new list, no sort). ``median - a == |a - median|`` exactly in
    IEEE arithmetic, so the values are those NumPy's ``abs(h - m)`` gives.
    """
    n = len(ordered)
    below = bisect_left(ordered, median)  # ordered[:below] < median <= ordered[below:]
    above = n - below

    def kth(rank: int) -> float:
        lo, hi = max(0, rank + 1 - above), min(rank + 1, below)  # how many come from below
        while lo < hi:
            take = (lo + hi) // 2
            if median - ordered[below - 1 - take] < ordered[below + rank - take] - median:
                lo = take + 1
            else:
                hi = take
        best = -math.inf
        if lo > 0:
            best = median - ordered[below - lo]
        if rank - lo >= 0:
            best = max(best, ordered[below + rank - lo] - median)
        return best

    return kth


def _sorted_mad(ordered: list[float], median: float) -> float:
    """``median(|ordered - median|)`` as NumPy computes it, from the sorted values alone."""
    n = len(ordered)
    kth = _deviation_kth(ordered, median)
    return (kth((n - 1) // 2) + kth(n // 2)) / 2


class RobustRule:
    """The rule, one value at a time (the agent's host detector and the server's loop).

    ``update(value)`` returns a :class:`Verdict`. After a level shift,
    ``transition`` holds the positions (the count of finite values before each) of
    the flagged values that led up to it (the server relabels them; the agent sends
    them as the spikes they were called when they came). ``last_k`` is the k the
    last judged value was held to (None during warm-up).

    A sorted copy of the history is kept beside the ring, so a step costs two
    bisections and three binary searches, not a sort.
    """

    def __init__(self, *, log: bool = True, k: float | None = K, history: int = HISTORY, warmup: int = WARMUP,
                 shift_window: int = SHIFT_WINDOW, shift_span: int = SHIFT_SPAN, min_scale: float = MIN_SCALE,
                 k_gauss: float = K_GAUSS, k_min: float = K_MIN, k_max: float = K_MAX,
                 tail_quantile: float = TAIL_QUANTILE, tail_power: float = TAIL_POWER, tail_min: int = TAIL_MIN):
        check_params(k, history, warmup, shift_window, shift_span, min_scale)
        self.log, self.k, self.history, self.warmup = bool(log), None if k is None else float(k), int(history), \
            int(warmup)
        self.shift_window, self.shift_span, self.min_scale = int(shift_window), int(shift_span), float(min_scale)
        self.shift_count = self.shift_window // 2   # "more than half of the window": the median is above
        self.k_gauss, self.k_min, self.k_max = float(k_gauss), float(k_min), float(k_max)
        self.tail_quantile, self.tail_power, self.tail_min = float(tail_quantile), float(tail_power), int(tail_min)
        self._tail_num, self._tail_den = quantile_fraction(self.tail_quantile)
        self._tail_gauss = tail_gauss(self.tail_quantile)
        self._ring = [0.0] * self.history
        self._ordered: list[float] = []
        self.filled = 0   # values written since the last refill
        self.seen = 0     # finite values ever
        self._recent: deque[tuple[int, float, bool]] = deque(maxlen=self.shift_window)
        self._recent_sorted: list[float] = []   # the recent window's raw values, sorted
        self._newest_sorted: list[float] = []   # its newest half, sorted
        self._run = 0     # consecutive finite steps with the recent median above the bound
        self.transition: list[int] = []
        self.last_k: float | None = None

    def config(self) -> dict:
        return {"k": self.k, "history": self.history, "warmup_steps": self.warmup,
                "shift_window": self.shift_window, "shift_span": self.shift_span, "min_scale": self.min_scale,
                "k_gauss": self.k_gauss, "k_min": self.k_min, "k_max": self.k_max,
                "tail_quantile": self.tail_quantile, "tail_power": self.tail_power, "tail_min": self.tail_min}

    def update(self, value: float) -> Verdict:
        """Judge ``value`` against the history, then let it in (unless flagged)."""
        if not math.isfinite(value):
            self.transition = []
            return self._nonfinite(value)
        return self.judge(math.log(max(value, TINY)) if self.log else value)

    def _k(self, ordered: list[float], median: float, mad: float, kth) -> float:
        if self.k is not None:
            return self.k
        n = len(ordered)
        if n < self.tail_min or not mad > 0:
            return self.k_max
        tail = kth((n - 1) * self._tail_num // self._tail_den) / mad
        return min(max(self.k_gauss * (tail / self._tail_gauss) ** self.tail_power, self.k_min), self.k_max)

    def judge(self, value: float) -> Verdict:
        """:meth:`update` for a finite value already in the rule's space (the log of a norm
        when ``log``): for callers that take the logs of a whole series at once."""
        self.transition = []
        ready = self.seen >= self.warmup
        flagged, score, k, bound, scale = False, 0.0, None, math.inf, 0.0
        if ready:
            ordered = self._ordered
            median = _sorted_median(ordered)
            kth = _deviation_kth(ordered, median)
            n = len(ordered)
            mad = (kth((n - 1) // 2) + kth(n // 2)) / 2
            floor = self.min_scale if self.log else self.min_scale * abs(median)
            scale = max(MAD_TO_SIGMA * mad, floor)
            k = self._k(ordered, median, mad, kth)
            if scale > 0:
                score = (value - median) / scale
            else:
                score = math.inf if value > median else (0.0 if value == median else -math.inf)
            flagged = score > k
            bound = median + k * scale
        self.last_k = k
        if not flagged:
            self._write(value)
        recent = self._recent
        half = self.shift_window // 2
        if len(recent) == self.shift_window:
            old = recent[0][1]
            del self._recent_sorted[bisect_left(self._recent_sorted, old)]
        if len(recent) >= half:
            leaving = recent[-half][1]   # leaves the newest half as this value comes in
            del self._newest_sorted[bisect_left(self._newest_sorted, leaving)]
        recent.append((self.seen, value, flagged))
        insort(self._recent_sorted, value)
        insort(self._newest_sorted, value)
        self.seen += 1
        if ready and self._recent_above(bound):
            self._run += 1
        else:
            self._run = 0
        if flagged and self._run >= self.shift_span:
            self.transition = [position for position, _, was in recent if was and position != self.seen - 1]
            self._refill([raw for _, raw, _ in recent], k)
            self._recent = deque(((position, raw, False) for position, raw, _ in recent), maxlen=self.shift_window)
            self._run = 0   # (the sorted copies hold the same values: unchanged)
            return Verdict(score, False, True, ready)
        return Verdict(score, flagged, False, ready)

    def _recent_above(self, bound: float) -> bool:
        """More than half of the recent window, and of its newest half, above ``bound``."""
        half = self.shift_window // 2
        above = len(self._recent_sorted) - bisect_right(self._recent_sorted, bound)
        if above <= half:
            return False
        return len(self._newest_sorted) - bisect_right(self._newest_sorted, bound) > half // 2

    def _nonfinite(self, value: float) -> Verdict:
        if value != value:
            score = math.nan
        elif self._ordered:
            score = value   # +-inf
        else:
            score = math.nan
        return Verdict(score, True, False, self.seen >= self.warmup)

    def _write(self, fed: float) -> None:
        slot = self.filled % self.history
        if self.filled >= self.history:
            old = self._ring[slot]
            del self._ordered[bisect_left(self._ordered, old)]
        self._ring[slot] = fed
        insort(self._ordered, fed)
        self.filled += 1

    def _refill(self, values: list[float], k: float) -> None:
        """The history after a level shift: the recent raw values within their own median ± k·scale."""
        ordered = sorted(values)
        median = _sorted_median(ordered)
        floor = self.min_scale if self.log else self.min_scale * abs(median)
        scale = max(MAD_TO_SIGMA * _sorted_mad(ordered, median), floor)
        kept = [value for value in values if abs(value - median) <= k * scale]
        self._ring[:len(kept)] = kept
        self._ordered = sorted(kept)
        self.filled = len(kept)


@dataclass
class RobustSpikes:
    """What the robust rule found in a series (arrays aligned with its values).

    ``spike``: bool, a spike (non-finite values included). ``level_shift``:
    bool, the step that started a new regime. ``transition``: bool, the
    flagged steps that led up to a level shift (neither clean nor spikes of
    the new regime). ``score``: the robust z-score (0 during warm-up, NaN for
    a non-finite value). ``ready``: bool, past warm-up.
    """

    spike: np.ndarray
    level_shift: np.ndarray
    transition: np.ndarray
    score: np.ndarray
    ready: np.ndarray

    @property
    def level_shift_index(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.level_shift)]


def _as_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values] if not isinstance(values, np.ndarray)
                      else values, dtype=np.float64)


def robust_spikes(values: Sequence[float] | np.ndarray, *, log: bool = True, k: float | None = K,
                  history: int = HISTORY, warmup: int = WARMUP, shift_window: int = SHIFT_WINDOW,
                  shift_span: int = SHIFT_SPAN, min_scale: float = MIN_SCALE, **tail) -> RobustSpikes:
    """The robust spike rule over ``values`` (oldest first), one-sided.

    ``log=True`` (norms): in log space, the same rule and defaults as the
    agent's detectors (``min_scale`` in log units). ``log=False`` (losses,
    which can be <= 0): in linear space, and the scale is floored at
    ``min_scale·|median|`` instead (relative, so it works at any loss scale).
    ``k=None`` adapts k to the history's tail (``tail``: ``k_gauss``, ``k_min``,
    ``k_max``, ``tail_quantile``, ``tail_power``, ``tail_min``); a number fixes it.
    None values are treated as NaN (a spike); callers drop missing values first.
    The flags that led up to a level shift are moved from ``spike`` to ``transition``.

    One step at a time with :class:`RobustRule` (the history holds only unflagged
    values, so a step's history depends on the flags before it; about 8 µs a step).
    """
    check_params(k, history, warmup, shift_window, shift_span, min_scale)
    x = _as_values(values)
    n = len(x)
    rule = RobustRule(log=log, k=k, history=history, warmup=warmup, shift_window=shift_window,
                      shift_span=shift_span, min_scale=min_scale, **tail)
    spike = np.zeros(n, bool)
    level_shift = np.zeros(n, bool)
    transition = np.zeros(n, bool)
    score = np.zeros(n)
    ready = np.zeros(n, bool)
    finite = np.isfinite(x)
    if log:   # the logs of the whole series at once
        with np.errstate(divide="ignore", invalid="ignore"):
            transformed = np.log(np.maximum(x, TINY))
    else:
        transformed = x
    finite_index: list[int] = []   # series index of each finite value, by the rule's position
    judge = rule.judge
    for i, (value, is_finite) in enumerate(zip(transformed.tolist(), finite.tolist())):
        if not is_finite:
            ready[i] = rule.seen >= warmup
            spike[i] = True
            score[i] = math.nan if x[i] != x[i] or rule.seen == 0 else x[i]
            continue
        verdict = judge(value)
        ready[i] = verdict.ready
        finite_index.append(i)
        score[i] = verdict.score
        spike[i] = verdict.spike
        if verdict.level_shift:
            level_shift[i] = True
            for position in rule.transition:
                transition[finite_index[position]] = True
                spike[finite_index[position]] = False
    return RobustSpikes(spike=spike, level_shift=level_shift, transition=transition, score=score, ready=ready)


robust_loop = robust_spikes   # the name the server's tests and older callers use for the reference loop


def burst_runs(flags: np.ndarray, steps: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """Runs of consecutive flagged positions: [(first, last, length)], in ``steps`` when given."""
    flags = np.asarray(flags, bool)
    if not flags.any():
        return []
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    if steps is not None:
        return [(int(steps[a]), int(steps[b]), int(b - a + 1)) for a, b in zip(starts, ends)]
    return [(int(a), int(b), int(b - a + 1)) for a, b in zip(starts, ends)]
