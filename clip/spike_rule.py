"""The robust spike rule in NumPy and plain Python: one implementation for the agent and the server.

The agent's host detector (``gradwatch.agent.host_detector``, one step late in
the sender thread) and the server's diagnostics (``gradwatch.server.analysis.diagnostics``)
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
    k = clip(k_gauss · (tail / tail_gauss)^power, k_min, k_max)
    tail = (mean of the top c values of h - m) / median(d),  c = n - ⌊q·n⌋
    spike = score > k (one-sided);  h ← h + [l] only when l is not a spike

The bound adapts to the *upper* tail the history shows, the side the one-sided rule
judges: ``tail`` is how far the mean of the history's top 5% (q = 0.95; 10 of 200
values, read from the sort the median already needs) lies above the median, in MADs.
For normal noise it is ``tail_gauss`` (φ(z₀.₉₅) / 0.05 / 0.6745 = 3.058) and k =
``k_gauss`` (3.25); for Student-t(4) noise it is about 4.2 and k at its cap 6
(``benchmarks/rule_lab.py`` prints the calibration). The lower tail is left out on
purpose: the log of a small batch's gradient norm is skewed, with a long *lower* tail
(a chi-square's log), which a two-sided estimate took for heavy noise, raising k where
the upper side was light (issue 21: recall on 3-6x spikes 0.904 two-sided, 0.98 with
the upper tail). The mean of the top values rather than one order statistic: its
spread over 200 values is what separates normal from t(4) noise (1.8 spreads apart,
against 1.45 for the 97.5% quantile). Until the history holds ``tail_min`` (100)
values, or when ``k`` is given, k is fixed (``k_max`` / ``k``). A flagged value never
enters the history, so spikes do not inflate the tail estimate.

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

:class:`RobustRule` applies the rule one value at a time (the agent, ~8 µs a step).
:func:`robust_spikes` applies it to a whole series (the server) with the same answer
bit for bit, judging blocks of steps at once with NumPy where the history is a
sliding window over the unflagged values (``benchmarks/spike_rule_bench.py``:
3-4x faster on 20,400 steps; ``tests/test_spike_rule_fast.py`` holds it to the loop).
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
K_MAX = 6.0         # also k while the history is short
TAIL_QUANTILE = 0.95   # the tail is the mean of the history's values above this quantile
TAIL_POWER = 3.0
TAIL_MIN = 100
HISTORY = 200
WARMUP = 25
SHIFT_WINDOW = 16
SHIFT_SPAN = 8
MIN_SCALE = 0.01


def tail_gauss(quantile: float = TAIL_QUANTILE) -> float:
    """``tail`` of a normal sample: E[X | X > z_q] / Φ⁻¹(3/4) = φ(z_q) / (1 - q) / Φ⁻¹(3/4)."""
    normal = NormalDist()
    return normal.pdf(normal.inv_cdf(quantile)) / (1 - quantile) / normal.inv_cdf(0.75)


def quantile_fraction(quantile: float) -> tuple[int, int]:
    """q as a fraction (numerator, denominator): the rank ⌊q·(n-1)⌋ is computed in integers,
    so NumPy and MLX (float32) read the same order statistic."""
    frac = Fraction(quantile).limit_denominator(1000)
    return frac.numerator, frac.denominator


def top_mean(ordered: Sequence[float], count: int) -> float:
    """The mean of the last ``count`` values of a sorted sequence, summed one by one from the
    smallest (the fast path and MLX-free callers repeat this order, so the bits agree; Python's
    ``sum`` may compensate)."""
    total = 0.0
    for value in ordered[len(ordered) - count:]:
        total += value
    return total / count


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

    def _k(self, ordered: list[float], median: float, mad: float) -> float:
        if self.k is not None:
            return self.k
        n = len(ordered)
        if n < self.tail_min or not mad > 0:
            return self.k_max
        count = n - n * self._tail_num // self._tail_den   # the top values above the q quantile: n - ⌊q·n⌋
        tail = (top_mean(ordered, count) - median) / mad
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
            k = self._k(ordered, median, mad)
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
                  shift_span: int = SHIFT_SPAN, min_scale: float = MIN_SCALE, fast: bool = True,
                  **tail) -> RobustSpikes:
    """The robust spike rule over ``values`` (oldest first), one-sided.

    ``log=True`` (norms): in log space, the same rule and defaults as the
    agent's detectors (``min_scale`` in log units). ``log=False`` (losses,
    which can be <= 0): in linear space, and the scale is floored at
    ``min_scale·|median|`` instead (relative, so it works at any loss scale).
    ``k=None`` adapts k to the history's tail (``tail``: ``k_gauss``, ``k_min``,
    ``k_max``, ``tail_quantile``, ``tail_power``, ``tail_min``); a number fixes it.
    None values are treated as NaN (a spike); callers drop missing values first.
    The flags that led up to a level shift are moved from ``spike`` to ``transition``.

    The answer is that of :class:`RobustRule` fed one value at a time (``fast=False``
    does exactly that, about 8 µs a step). ``fast=True`` (the default) gives the same
    arrays bit for bit, judging whole blocks of steps at once with NumPy while the
    history is full and nothing is flagged (see :func:`_judge_block`), and the other
    steps (warm-up, a flagged step, the refill after a level shift) with the rule.
    """
    check_params(k, history, warmup, shift_window, shift_span, min_scale)
    x = _as_values(values)
    rule = RobustRule(log=log, k=k, history=history, warmup=warmup, shift_window=shift_window,
                      shift_span=shift_span, min_scale=min_scale, **tail)
    finite = np.isfinite(x)
    if log:   # the logs of the whole series at once
        with np.errstate(divide="ignore", invalid="ignore"):
            transformed = np.log(np.maximum(x, TINY))
    else:
        transformed = x
    if not fast:
        return _robust_loop(rule, x, transformed, finite)
    # Non-finite values enter no state of the rule: judge the finite values as one stream.
    finite_index = np.flatnonzero(finite)
    f_score, f_spike, f_shift, f_transition = _judge_stream(rule, transformed[finite_index])
    seen_before = np.cumsum(finite) - finite   # finite values before each step
    spike = ~finite
    spike[finite_index] = f_spike
    level_shift = np.zeros(len(x), bool)
    level_shift[finite_index] = f_shift
    transition = np.zeros(len(x), bool)
    transition[finite_index] = f_transition
    score = np.where(np.isnan(x) | (seen_before == 0), np.nan, x)
    score[finite_index] = f_score
    return RobustSpikes(spike=spike, level_shift=level_shift, transition=transition, score=score,
                        ready=seen_before >= warmup)


def robust_loop(values: Sequence[float] | np.ndarray, **kwargs) -> RobustSpikes:
    """:func:`robust_spikes` one step at a time (``fast=False``): the reference the fast path is held to."""
    return robust_spikes(values, fast=False, **kwargs)


def _robust_loop(rule: RobustRule, x: np.ndarray, transformed: np.ndarray, finite: np.ndarray) -> RobustSpikes:
    n = len(x)
    spike = np.zeros(n, bool)
    level_shift = np.zeros(n, bool)
    transition = np.zeros(n, bool)
    score = np.zeros(n)
    ready = np.zeros(n, bool)
    finite_index: list[int] = []   # series index of each finite value, by the rule's position
    judge = rule.judge
    for i, (value, is_finite) in enumerate(zip(transformed.tolist(), finite.tolist())):
        if not is_finite:
            ready[i] = rule.seen >= rule.warmup
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


_BLOCK_MIN, _BLOCK_MAX = 64, 1024   # steps judged at once by the fast path (the size adapts)
_HINT_STRIDE = 16   # the guess of the flags reads the history every 16th step


def _judge_stream(rule: RobustRule, stream: np.ndarray, guess: np.ndarray | None = None):
    """``rule`` over a stream of finite values (in its space): score, spike, level_shift and
    transition arrays, by position. Blocks go through :func:`_judge_block` while the history
    ring is full; each step that stops a block (and warm-up, refills) goes through ``rule.judge``.
    ``guess``: where flags are expected (default :func:`_guess_flags`); it changes only the speed."""
    n = len(stream)
    score = np.zeros(n)
    spike = np.zeros(n, bool)
    level_shift = np.zeros(n, bool)
    transition = np.zeros(n, bool)
    guess = _guess_flags(rule, stream) if guess is None else np.array(guess, bool)
    values = stream.tolist()
    block = _BLOCK_MIN
    pos = 0
    while pos < n:
        if rule.seen >= rule.warmup and rule.filled >= rule.history and len(rule._recent) == rule.shift_window:
            size = min(block, n - pos)
            accepted = _judge_block(rule, stream, pos, size, score, spike, guess)
            pos += accepted
            if accepted == size:
                block = min(2 * block, _BLOCK_MAX)
                continue
            block = max(block // 2, _BLOCK_MIN)
        verdict = rule.judge(values[pos])   # the step that stopped the block, or one outside the fast path
        score[pos] = verdict.score
        spike[pos] = verdict.spike
        if verdict.level_shift:
            level_shift[pos] = True
            transition[rule.transition] = True
            spike[rule.transition] = False
        pos += 1
    return score, spike, level_shift, transition


def _windows(values: np.ndarray, width: int) -> np.ndarray:
    """The rows values[i:i + width] (a read-only view; NumPy's sliding_window_view, without its
    ~10 µs of checks per call)."""
    values = np.ascontiguousarray(values)
    view = np.ndarray((len(values) - width + 1, width), values.dtype, values, 0,
                      (values.itemsize, values.itemsize))
    view.flags.writeable = False
    return view


def _python_pow(base: np.ndarray, exponent: float) -> np.ndarray:
    """``base ** exponent`` with Python's float power (the rule's; NumPy's SIMD power may differ
    in the last bit). NaN where Python raises (the rule then judges that step itself and raises)."""
    try:
        return np.array([b ** exponent for b in base.tolist()], dtype=np.float64)
    except (OverflowError, ZeroDivisionError):
        out = []
        for b in base.tolist():
            try:
                out.append(b ** exponent)
            except (OverflowError, ZeroDivisionError):
                out.append(math.nan)
        return np.array(out, dtype=np.float64)


def _window_stats(rule: RobustRule, windows: np.ndarray, exact: bool = True):
    """median, scale and k of each row of ``windows`` (histories of ``rule.history`` values),
    with the rule's formulas on the same float64 values."""
    history = rule.history
    ordered = np.sort(windows, axis=1)
    low, high = (history - 1) // 2, history // 2
    adaptive = rule.k is None and history >= rule.tail_min
    if adaptive:   # the top values' sum, one column at a time from the smallest (top_mean's order)
        count = history - history * rule._tail_num // rule._tail_den
        with np.errstate(over="ignore", invalid="ignore"):
            top = ordered[:, history - count].copy()
            for column in range(history - count + 1, history):
                top += ordered[:, column]
            top /= count
    with np.errstate(over="ignore", invalid="ignore"):   # (a non-finite median stops the block: the loop judges it)
        median = (ordered[:, low] + ordered[:, high]) / 2
        deviation = ordered   # |h - m| sorted, in place (no second matrix)
        np.subtract(ordered, median[:, None], out=deviation)
    np.abs(deviation, out=deviation)
    deviation.sort(axis=1)
    mad = (deviation[:, low] + deviation[:, high]) / 2
    floor = rule.min_scale if rule.log else rule.min_scale * np.abs(median)
    scale = np.maximum(MAD_TO_SIGMA * mad, floor)
    if rule.k is not None:
        k = np.full(len(median), rule.k)
    elif not adaptive:
        k = np.full(len(median), rule.k_max)
    else:
        spread = mad > 0
        with np.errstate(all="ignore"):
            ratio = (top - median) / np.where(spread, mad, 1.0) / rule._tail_gauss
            powered = _python_pow(ratio, rule.tail_power) if exact else np.power(ratio, rule.tail_power)
        k = np.where(spread, np.minimum(np.maximum(rule.k_gauss * powered, rule.k_min), rule.k_max), rule.k_max)
    return median, scale, k


def _guess_flags(rule: RobustRule, stream: np.ndarray) -> np.ndarray:
    """A cheap guess of which values the rule flags (the history read every 16th step, flagged
    values not left out, no level shifts): where the blocks of :func:`_judge_block` expect a flag.
    Only speed depends on it; a wrong guess stops a block there."""
    n, history = len(stream), rule.history
    guess = np.zeros(n, bool)
    if n <= history:
        return guess
    first = np.arange(0, n - history, _HINT_STRIDE)   # the windows stream[j:j + history] read
    median, scale, k = _window_stats(rule, _windows(stream, history)[first], exact=False)
    which = (np.arange(n - history)) // _HINT_STRIDE
    with np.errstate(all="ignore"):
        guess[history:] = (stream[history:] - median[which]) / scale[which] > k[which]
    return guess


def _judge_block(rule: RobustRule, stream: np.ndarray, pos: int, size: int, score: np.ndarray, spike: np.ndarray,
                 guess: np.ndarray) -> int:
    """Judge ``stream[pos:pos + size]`` at once, for a rule whose history ring is full.

    The history of a step is the last ``history`` unflagged values before it. Given which
    steps of the block are flagged (``guess``), the histories of the block's steps are the
    rows of a sliding window over the ring's values followed by the block's unflagged ones
    (a flagged step and the next share a row). Each row is sorted; the median, the MAD, the
    tail's order statistic, k, the score and the bound are the rule's formulas on the same
    float64 values (IEEE operations give the same bits; the power is Python's), and so is
    the level-shift run (the recent raw values above each step's bound). The steps are
    accepted up to the first whose flag differs from the guess, that would declare a level
    shift, or whose numbers are not finite (or scale 0): their scores and flags are written,
    the rule's state is moved past them (ring, sorted copies, recent window, ``_run``,
    ``last_k``), and the count is returned; the step that stopped the block is left to
    ``rule.judge``. The flags found after it become the guess for the next block.
    """
    history, window, half = rule.history, rule.shift_window, rule.shift_window // 2
    start = rule.filled % history
    ring = rule._ring
    before = np.array(ring[start:] + ring[:start], dtype=np.float64)   # the history, oldest first
    block = stream[pos:pos + size]
    guessed = guess[pos:pos + size]
    kept = ~guessed
    row = np.cumsum(kept) - kept   # unflagged values of the block before each step: its history's row
    last_row = int(row[-1])
    unflagged = np.concatenate([before, block[kept][:last_row]])
    median, scale, k = _window_stats(rule, _windows(unflagged, history))
    median, scale, k = median[row], scale[row], k[row]
    with np.errstate(all="ignore"):
        step_score = (block - median) / scale
        bound = median + k * scale
    flagged = step_score > k
    # The level-shift run: the recent window (finite raw values, this one included) against each bound.
    recent = rule._recent
    raw = np.concatenate([np.array([value for _, value, _ in recent], dtype=np.float64), block])
    over = _windows(raw[1:], window) > bound[:, None]
    above = (np.count_nonzero(over, axis=1) > half) & (np.count_nonzero(over[:, window - half:], axis=1) > half // 2)
    steps = np.arange(size)
    last_below = np.maximum.accumulate(np.where(above, -1, steps))
    run = np.where(last_below >= 0, steps - last_below, rule._run + steps + 1)
    stop = (flagged != guessed) | (flagged & (run >= rule.shift_span)) | ~(scale > 0) | ~np.isfinite(scale) \
        | ~np.isfinite(k) | ~np.isfinite(step_score) | ~np.isfinite(bound)
    accepted = int(np.argmax(stop)) if stop.any() else size
    guess[pos + accepted + 1:pos + size] = flagged[accepted + 1:]
    if accepted == 0:
        return 0
    score[pos:pos + accepted] = step_score[:accepted]
    spike[pos:pos + accepted] = flagged[:accepted]
    # The state after the accepted steps, as the rule would have left it.
    written = int(row[accepted - 1]) + int(kept[accepted - 1])
    history_now = np.concatenate([before, block[kept][:written]])[-history:]   # oldest first
    rule.filled += written
    start = rule.filled % history
    rule._ring = history_now[history - start:].tolist() + history_now[:history - start].tolist()
    rule._ordered = np.sort(history_now).tolist()
    first = rule.seen
    tail = max(0, accepted - window)   # only the newest ``window`` stay in the recent window
    recent.extend(zip(range(first + tail, first + accepted), block[tail:accepted].tolist(),
                      flagged[tail:accepted].tolist()))
    newest = raw[accepted:accepted + window]
    rule._recent_sorted = np.sort(newest).tolist()
    rule._newest_sorted = np.sort(newest[window - half:]).tolist()
    rule.seen += accepted
    rule._run = int(run[accepted - 1])
    rule.last_k = float(k[accepted - 1])
    rule.transition = []
    return accepted


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
