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
which can be <= 0), against the history h of the last ``history`` earlier values::

    m = median(h);  s = max(1.4826·MAD(h), floor);  score = (l - m) / s
    spike = score > k (one-sided);  h ← h + [min(l, m + k·s)]

``floor`` is ``min_scale`` in log space and ``min_scale·|m|`` in linear space.
Nothing is flagged before ``warmup`` finite values were seen. Non-finite
values are spikes and enter nothing. Level shift: when more than
``shift_count`` of the last ``shift_window`` finite values were flagged, the
step that tips it is a ``level_shift`` (not a spike), the history becomes
those recent *raw* values (oldest first) and their flags are cleared.
"""
from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): the MAD of a normal sample times this is its σ
TINY = 1e-30  # log floor: a zero norm is low, never a spike, and never -inf in the history

# The defaults of the rule (docs/diagnostics.md says why).
K = 5.0
HISTORY = 200
WARMUP = 25
SHIFT_WINDOW = 20
SHIFT_COUNT = 10
MIN_SCALE = 0.01


def check_params(k: float, history: int, warmup: int, shift_window: int, shift_count: int,
                 min_scale: float) -> None:
    if shift_window > history or shift_count >= shift_window:
        raise ValueError("need shift_count < shift_window <= history")


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


def _sorted_mad(ordered: list[float], median: float) -> float:
    """``median(|ordered - median|)`` as NumPy computes it, from the sorted values alone.

    The deviations below the median, read downwards, and those above it, read upwards,
    are two sorted sequences; each middle order statistic of their union is found by a
    binary search (no new list, no sort). ``median - a == |a - median|`` exactly in
    IEEE arithmetic, so the values are those NumPy's ``abs(h - m)`` gives.
    """
    n = len(ordered)
    below = bisect_left(ordered, median)  # ordered[:below] < median <= ordered[below:]
    above = n - below

    def kth(rank: int) -> float:   # the rank-th smallest deviation, 0-based
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

    return (kth((n - 1) // 2) + kth(n // 2)) / 2


class RobustRule:
    """The rule, one value at a time (the agent's host detector and the server's loop).

    ``update(value)`` returns a :class:`Verdict`. After a level shift,
    ``transition`` holds the positions (the count of finite values before each) of
    the flagged values that led up to it (the server relabels them; the agent sends
    them as the spikes they were called when they came).

    A sorted copy of the history is kept beside the ring, so a step costs two
    bisections and a binary search, not a sort.
    """

    def __init__(self, *, log: bool = True, k: float = K, history: int = HISTORY, warmup: int = WARMUP,
                 shift_window: int = SHIFT_WINDOW, shift_count: int = SHIFT_COUNT, min_scale: float = MIN_SCALE):
        check_params(k, history, warmup, shift_window, shift_count, min_scale)
        self.log, self.k, self.history, self.warmup = bool(log), float(k), int(history), int(warmup)
        self.shift_window, self.shift_count, self.min_scale = int(shift_window), int(shift_count), float(min_scale)
        self._ring = [0.0] * self.history
        self._ordered: list[float] = []
        self.filled = 0   # values written since the last refill
        self.seen = 0     # finite values ever
        self._recent: deque[tuple[int, float, bool]] = deque(maxlen=self.shift_window)
        self._recent_flags = 0
        self.transition: list[int] = []

    def update(self, value: float) -> Verdict:
        """Judge ``value`` against the history, then let it in (clipped when flagged)."""
        if not math.isfinite(value):
            self.transition = []
            return self._nonfinite(value)
        return self.judge(math.log(max(value, TINY)) if self.log else value)

    def judge(self, value: float) -> Verdict:
        """:meth:`update` for a finite value already in the rule's space (the log of a norm
        when ``log``): for callers that take the logs of a whole series at once."""
        self.transition = []
        ready = self.seen >= self.warmup
        fed, flagged, score = value, False, 0.0
        if ready:
            median = _sorted_median(self._ordered)
            floor = self.min_scale if self.log else self.min_scale * abs(median)
            scale = max(MAD_TO_SIGMA * _sorted_mad(self._ordered, median), floor)
            if scale > 0:
                score = (value - median) / scale
            else:
                score = math.inf if value > median else (0.0 if value == median else -math.inf)
            flagged = score > self.k
            fed = min(value, median + self.k * scale)
        self._write(fed)
        recent = self._recent
        if len(recent) == self.shift_window and recent[0][2]:
            self._recent_flags -= 1
        recent.append((self.seen, value, flagged))
        self._recent_flags += flagged
        self.seen += 1
        if flagged and self._recent_flags > self.shift_count:
            self.transition = [position for position, _, was in recent if was and position != self.seen - 1]
            self._refill([raw for _, raw, _ in recent])
            self._recent = deque(((position, raw, False) for position, raw, _ in recent), maxlen=self.shift_window)
            self._recent_flags = 0
            return Verdict(score, False, True, ready)
        return Verdict(score, flagged, False, ready)

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

    def _refill(self, values: list[float]) -> None:
        self._ring[:len(values)] = values
        self._ordered = sorted(values)
        self.filled = len(values)


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


def robust_spikes(values: Sequence[float] | np.ndarray, *, log: bool = True, k: float = K,
                  history: int = HISTORY, warmup: int = WARMUP, shift_window: int = SHIFT_WINDOW,
                  shift_count: int = SHIFT_COUNT, min_scale: float = MIN_SCALE) -> RobustSpikes:
    """The robust spike rule over ``values`` (oldest first), one-sided.

    ``log=True`` (norms): in log space, the same rule and defaults as the
    agent's detectors (``min_scale`` in log units). ``log=False`` (losses,
    which can be <= 0): in linear space, and the scale is floored at
    ``min_scale·|median|`` instead (relative, so it works at any loss scale).
    None values are treated as NaN (a spike); callers drop missing values first.

    Exactly the step-by-step rule (:func:`robust_loop`), computed a block of steps
    at a time where that is provably the same: the medians of the raw values'
    windows equal those of the fed (clipped) windows whenever every clipped
    value stays above both middle order statistics of the windows it is in
    (checked); series with a level shift take the loop.
    """
    check_params(k, history, warmup, shift_window, shift_count, min_scale)
    x = _as_values(values)
    params = dict(log=log, k=k, history=history, warmup=warmup, shift_window=shift_window,
                  shift_count=shift_count, min_scale=min_scale)
    finite_all = np.isfinite(x)
    positions = np.flatnonzero(finite_all)
    if len(positions) <= 2 * history:
        return robust_loop(x, **params)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            lx = np.log(np.maximum(x[positions], TINY))
    else:
        lx = x[positions]
    prefix = robust_loop(x[positions[:history]], **params)
    if prefix.level_shift.any():
        return robust_loop(x, **params)
    fast = _blocked_rule(lx, prefix, k=k, history=history, shift_window=shift_window, shift_count=shift_count,
                         min_scale=min_scale, log=log)
    if fast is None:
        return robust_loop(x, **params)
    flagged, z = fast
    n = len(x)
    spike = ~finite_all
    spike[positions[flagged]] = True
    seen_before = np.cumsum(finite_all) - finite_all
    score = np.where(finite_all, 0.0, np.nan)
    score[positions] = z
    return RobustSpikes(spike=spike, level_shift=np.zeros(n, bool), transition=np.zeros(n, bool), score=score,
                        ready=seen_before >= warmup)


def _blocked_rule(lx: np.ndarray, prefix: RobustSpikes, *, k: float, history: int, shift_window: int,
                  shift_count: int, min_scale: float, log: bool, block: int = 2048
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(flagged, score) over finite transformed values `lx`, the first `history` taken from the
    loop's `prefix`; None when the result cannot be shown to equal the loop's."""
    n, h = len(lx), history
    flagged = np.zeros(n, bool)
    z = np.zeros(n)
    flagged[:h] = prefix.spike
    z[:h] = prefix.score
    fed = lx.copy()
    for i in np.flatnonzero(prefix.spike).tolist():   # prefix spikes entered the history clipped
        window = fed[:i]
        med = float(np.median(window))
        floor = min_scale if log else min_scale * abs(med)
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(window - med))), floor)
        fed[i] = min(lx[i], med + k * scale)
    lo_k, hi_k = (h - 1) // 2, h // 2
    median, upper, dev_upper, scales = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    windows = np.lib.stride_tricks.sliding_window_view(fed, h)   # row r: fed[r:r + h], the history of step r + h
    for begin in range(h, n, block):
        end = min(begin + block, n)
        part = np.partition(windows[begin - h:end - h], hi_k, axis=1)   # one kth: 5x faster than two
        med = (part[:, :hi_k].max(axis=1) + part[:, hi_k]) / 2 if lo_k != hi_k else part[:, hi_k]
        dev = np.partition(np.abs(part - med[:, None]), hi_k, axis=1)
        mad = (dev[:, :hi_k].max(axis=1) + dev[:, hi_k]) / 2 if lo_k != hi_k else dev[:, hi_k]
        floor = min_scale if log else min_scale * np.abs(med)
        scale = np.maximum(MAD_TO_SIGMA * mad, floor)
        value = lx[begin:end]
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(scale > 0, (value - med) / np.where(scale > 0, scale, 1.0),
                             np.where(value > med, np.inf, np.where(value == med, 0.0, -np.inf)))
        z[begin:end] = score
        median[begin:end], upper[begin:end], dev_upper[begin:end], scales[begin:end] = \
            med, part[:, hi_k], dev[:, hi_k], scale
    flagged[h:] = z[h:] > k
    counts = np.cumsum(flagged)
    recent = counts - np.concatenate([np.zeros(shift_window, counts.dtype), counts[:-shift_window]])
    if np.any(flagged & (recent > shift_count)):
        return None   # a level shift: the history is replaced, the loop's business
    # The windows above hold the raw values of the steps flagged after the prefix; the loop
    # fed them clipped. Same medians and MADs as long as each clipped value stays above the
    # upper middle value, and the upper middle deviation, of every window it is in.
    for j in np.flatnonzero(flagged[h:]).tolist():
        j += h
        entered = min(lx[j], median[j] + k * scales[j])
        span = slice(j + 1, min(j + h, n - 1) + 1)
        if not (np.all(entered > upper[span]) and np.all(entered - median[span] > dev_upper[span])):
            return None
    return flagged, z


def robust_loop(values: Sequence[float] | np.ndarray, *, log: bool = True, k: float = K,
                history: int = HISTORY, warmup: int = WARMUP, shift_window: int = SHIFT_WINDOW,
                shift_count: int = SHIFT_COUNT, min_scale: float = MIN_SCALE) -> RobustSpikes:
    """`robust_spikes` one step at a time with :class:`RobustRule`: the reference, and the
    path for series the vectorised one cannot prove exact (level shifts, warm-up only).
    The flags that led up to a level shift are moved from ``spike`` to ``transition``."""
    check_params(k, history, warmup, shift_window, shift_count, min_scale)
    x = _as_values(values)
    n = len(x)
    rule = RobustRule(log=log, k=k, history=history, warmup=warmup, shift_window=shift_window,
                      shift_count=shift_count, min_scale=min_scale)
    spike = np.zeros(n, bool)
    level_shift = np.zeros(n, bool)
    transition = np.zeros(n, bool)
    score = np.zeros(n)
    ready = np.zeros(n, bool)
    finite = np.isfinite(x)
    if log:   # the logs of the whole series at once, as the blocked path takes them
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
            score[i] = math.nan
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
